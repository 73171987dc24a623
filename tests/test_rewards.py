"""rewards.py: tiny random reward models written in each checkpoint's real on-disk format and loaded through the real
loaders, the HPSv2.1 (open_clip) key mapping against an independent open_clip forward, torch preprocessing against
the PIL processors, the weight-free rewards, and the one-line errors. Nothing is downloaded."""
import hashlib
import json
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import rewards
from sampler import UsageError

WORDS = "a an the red blue green yellow circle square triangle cat dog photo of on left right two three".split()
PROMPTS = ["a red circle", "two blue squares on the left of a green triangle", "a photo of a cat", "dog"]
CHECKPOINTED = ["pickscore", "clip", "clip_dfn", "hpsv2", "aesthetic", "imagereward", "hpsv3"]
MEAN, STD = torch.tensor(rewards.OPENAI_MEAN).view(1, 3, 1, 1), torch.tensor(rewards.OPENAI_STD).view(1, 3, 1, 1)


# ----------------------------------------------------------------------------- tiny tokenizers, offline
def clip_tokenizer(folder):
    """A CLIP BPE tokenizer over a toy vocabulary; <|endoftext|> has the largest id, as in the real one (49407)."""
    from transformers import CLIPTokenizer
    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = ["<|startoftext|>", "!"] + [w + "</w>" for w in WORDS] + list(letters) + [c + "</w>" for c in letters]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens + ["<|endoftext|>"]))}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="!")
    tok.save_pretrained(folder)
    return tok


def bert_tokenizer(folder):
    from transformers import BertTokenizer
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + list("bcdefghijklmnopqrstuvwxyz")
    (folder / "vocab.txt").write_text("\n".join(vocab))
    tok = BertTokenizer(str(folder / "vocab.txt"))
    tok.save_pretrained(folder)
    return tok


def qwen_tokenizer(folder):
    """Byte-level BPE (as Qwen2's) trained on HPSv3's instruction, plus Qwen2-VL's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                "<|video_pad|>"]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([rewards.HPSV3_INSTRUCTION, rewards.HPSV3_CHAT] + PROMPTS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=specials[0], additional_special_tokens=specials[1:])
    fast.save_pretrained(folder)
    return fast


# ----------------------------------------------------------------------------- tiny models in the published layouts
def tiny_clip(tok, *, act="gelu", image=28):
    from transformers import CLIPConfig, CLIPModel
    torch.manual_seed(0)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=16, hidden_act=act, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=3, image_size=image,
                  patch_size=14, hidden_act=act)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    with torch.no_grad():
        model.logit_scale.fill_(4.6)
    return model


def hf_to_open_clip(hf: dict) -> dict:
    """The test's own inverse of rewards.open_clip_to_hf, from the open_clip layout's known structure."""
    sd = {"token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"],
          "positional_embedding": hf["text_model.embeddings.position_embedding.weight"],
          "ln_final.weight": hf["text_model.final_layer_norm.weight"],
          "ln_final.bias": hf["text_model.final_layer_norm.bias"],
          "text_projection": hf["text_projection.weight"].t(), "logit_scale": hf["logit_scale"],
          "visual.class_embedding": hf["vision_model.embeddings.class_embedding"],
          "visual.positional_embedding": hf["vision_model.embeddings.position_embedding.weight"],
          "visual.conv1.weight": hf["vision_model.embeddings.patch_embedding.weight"],
          "visual.proj": hf["visual_projection.weight"].t()}
    for ours, theirs in (("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post")):
        for p in ("weight", "bias"):
            sd[f"visual.{theirs}.{p}"] = hf[f"vision_model.{ours}.{p}"]
    for tower, prefix in (("text_model", ""), ("vision_model", "visual.")):
        i = 0
        while f"{tower}.encoder.layers.{i}.layer_norm1.weight" in hf:
            a, b = f"{tower}.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
            for p in ("weight", "bias"):
                sd[f"{b}attn.in_proj_{p}"] = torch.cat([hf[f"{a}self_attn.{x}_proj.{p}"] for x in "qkv"])
                for theirs, ours in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"),
                                     ("mlp.c_proj", "mlp.fc2"), ("attn.out_proj", "self_attn.out_proj")):
                    sd[f"{b}{theirs}.{p}"] = hf[f"{a}{ours}.{p}"]
            i += 1
    return {k: v.clone() for k, v in sd.items()}


def open_clip_cosine(sd, pixels, tokens, vision_heads, text_heads, act=F.gelu):
    """open_clip's forward written from its structure (nn.MultiheadAttention weights), independent of transformers."""
    def blocks(x, prefix, heads, mask=None):  # x (L, N, D)
        i = 0
        while f"{prefix}{i}.ln_1.weight" in sd:
            p = lambda n: sd[f"{prefix}{i}.{n}"]  # noqa: E731
            h = F.layer_norm(x, x.shape[-1:], p("ln_1.weight"), p("ln_1.bias"))
            x = x + F.multi_head_attention_forward(h, h, h, x.shape[-1], heads, p("attn.in_proj_weight"),
                                                   p("attn.in_proj_bias"), None, None, False, 0.0,
                                                   p("attn.out_proj.weight"), p("attn.out_proj.bias"),
                                                   training=False, need_weights=False, attn_mask=mask)[0]
            h = F.layer_norm(x, x.shape[-1:], p("ln_2.weight"), p("ln_2.bias"))
            x = x + F.linear(act(F.linear(h, p("mlp.c_fc.weight"), p("mlp.c_fc.bias"))), p("mlp.c_proj.weight"),
                             p("mlp.c_proj.bias"))
            i += 1
        return x
    ln = lambda x, n: F.layer_norm(x, x.shape[-1:], sd[f"{n}.weight"], sd[f"{n}.bias"])  # noqa: E731
    patch = sd["visual.conv1.weight"].shape[-1]
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=patch).flatten(2).transpose(1, 2)  # (N, P, D)
    x = torch.cat([sd["visual.class_embedding"].expand(len(x), 1, -1), x], 1) + sd["visual.positional_embedding"]
    x = blocks(ln(x, "visual.ln_pre").transpose(0, 1), "visual.transformer.resblocks.", vision_heads).transpose(0, 1)
    img = ln(x[:, 0], "visual.ln_post") @ sd["visual.proj"]
    t = sd["token_embedding.weight"][tokens] + sd["positional_embedding"][: tokens.shape[1]]
    causal = torch.full((tokens.shape[1],) * 2, float("-inf")).triu(1)
    t = ln(blocks(t.transpose(0, 1), "transformer.resblocks.", text_heads, causal).transpose(0, 1), "ln_final")
    txt = t[torch.arange(len(t)), tokens.argmax(-1)] @ sd["text_projection"]
    return (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """One folder per checkpoint-backed reward, each in the layout its published checkpoint uses."""
    root = tmp_path_factory.mktemp("rewards")
    out, refs = {}, {}
    # transformers-format CLIPs (PickScore, CLIP ViT-L/14) and the aesthetic MLP beside one
    out["pickscore"] = out["clip"] = root / "clip"
    tok = clip_tokenizer(root / "clip")
    model = tiny_clip(tok)
    model.save_pretrained(root / "clip")
    refs["clip"] = model
    torch.manual_seed(1)
    out["aesthetic"] = root / "clip"
    torch.save({f"layers.{i}.{p}": torch.randn(o, n) if p == "weight" else torch.randn(o)
                for i, (n, o) in zip((0, 2, 4, 6, 7), ((16, 32), (32, 16), (16, 8), (8, 4), (4, 1)))
                for p in ("weight", "bias")}, root / "clip" / "aesthetic-model.pth")
    # open_clip checkpoints: HPSv2.1 ({"state_dict": ...}, ViT-H-14 layout) and DFN5B (bare, QuickGELU, config file)
    for name, file, act, extra in (("hpsv2", "HPS_v2.1_compressed.pt", "gelu", {"resize_mode": "longest"}),
                                   ("clip_dfn", "open_clip_pytorch_model.bin", "quick_gelu", {})):
        folder = out[name] = root / name
        clip_tokenizer(folder)
        hf = tiny_clip(tok, act=act)
        refs[name] = hf
        sd = hf_to_open_clip(hf.state_dict())
        torch.save({"state_dict": sd} if name == "hpsv2" else sd, folder / file)
        cfg = {"model_cfg": {"quick_gelu": act == "quick_gelu", "vision_cfg": {"head_width": 16},
                             "text_cfg": {"heads": 2}},
               "preprocess_cfg": dict(extra, mean=list(rewards.OPENAI_MEAN), std=list(rewards.OPENAI_STD))}
        (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    out["imagereward"] = imagereward_dir(root / "imagereward")
    out["hpsv3"], refs["hpsv3"] = hpsv3_dir(root / "hpsv3")
    return out, refs


def imagereward_dir(folder):
    """ImageReward.pt: BLIP's timm ViT names under blip.visual_encoder, med.py BERT under blip.text_encoder, mlp."""
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel
    torch.manual_seed(2)
    tok = bert_tokenizer(folder)
    vision = BlipVisionModel(BlipVisionConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                              num_attention_heads=1, image_size=32, patch_size=16, layer_norm_eps=1e-6))
    med = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               max_position_embeddings=40, layer_norm_eps=1e-12, hidden_act="gelu", pad_token_id=0)
    text = BlipTextModel(BlipTextConfig(**med, encoder_hidden_size=64, is_decoder=True), add_pooling_layer=False)
    (folder / "med_config.json").write_text(json.dumps(dict(med, encoder_width=64, add_cross_attention=True)))
    names = {"embeddings.class_embedding": "cls_token", "embeddings.position_embedding": "pos_embed",
             "embeddings.patch_embedding": "patch_embed.proj", "post_layernorm": "norm", "encoder.layers.": "blocks.",
             "layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.qkv": "attn.qkv",
             "self_attn.projection": "attn.proj"}
    sd = {}
    for k, v in vision.state_dict().items():
        for ours, theirs in names.items():
            k = k.replace(ours, theirs)
        sd["blip.visual_encoder." + k] = v
    sd.update({"blip.text_encoder." + k: v for k, v in text.state_dict().items()})
    sd["blip.text_encoder.embeddings.position_ids"] = torch.arange(40)[None]  # med.py saves this buffer
    sd["blip.vision_proj.weight"] = torch.zeros(8, 64)  # in the file, unused by the reward
    for i, (n, o) in zip((0, 2, 4, 6, 7), ((32, 16), (16, 8), (8, 8), (8, 4), (4, 1))):
        sd[f"mlp.layers.{i}.weight"], sd[f"mlp.layers.{i}.bias"] = torch.randn(o, n) / n**0.5, torch.randn(o)
    torch.save(sd, folder / "ImageReward.pt")
    return folder


def hpsv3_dir(folder):
    """HPSv3.safetensors as transformers 4.45 saved it: model.* (LM), visual.*, lm_head, rm_head (ranknet)."""
    from safetensors.torch import save_file
    from transformers import Qwen2VLConfig, Qwen2VLModel
    torch.manual_seed(3)
    tok = qwen_tokenizer(folder)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>")}
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok) + 1, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, bos_token_id=None,
                         eos_token_id=None),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"])
    model = Qwen2VLModel(config).eval()
    config.save_pretrained(folder)
    nn = torch.nn  # HPSv3's "ranknet" head: rm_head.0, .3 and .5 are the Linear layers
    head = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.05), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 2))
    head.eval()
    sd = {("model." + k[len("language_model."):] if k.startswith("language_model.") else k): v
          for k, v in model.state_dict().items()}
    sd["lm_head.weight"] = torch.randn(len(tok) + 1, 64)
    sd.update({"rm_head." + k: v for k, v in head.state_dict().items()})
    save_file({k: v.contiguous() for k, v in sd.items()}, folder / "HPSv3.safetensors")
    return folder, (model, head)


def images(n=4, h=40, w=52, seed=0):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- 1. every checkpoint-backed reward
@pytest.mark.parametrize("name", CHECKPOINTED)
def test_reward_loads_tiny_checkpoint_and_scores_batches(dirs, name):
    fn = rewards.REWARDS[name](str(dirs[0][name]))
    x = images()
    scores = fn(x, PROMPTS)
    assert scores.shape == (4,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    assert torch.equal(fn(x, PROMPTS), scores)  # deterministic
    assert scores.std() > 0  # the images and prompts are told apart
    singles = torch.cat([fn(x[i:i + 1], PROMPTS[i:i + 1]) for i in range(4)])
    pairs = torch.cat([fn(x[i:i + 2], PROMPTS[i:i + 2]) for i in (0, 2)])
    torch.testing.assert_close(singles, scores, rtol=1e-5, atol=1e-5)  # independent of batch size and padding
    torch.testing.assert_close(pairs, scores, rtol=1e-5, atol=1e-5)


def test_pickscore_is_logit_scaled_clip_cosine(dirs):
    folder, refs = dirs
    x = images()
    clip, pick = rewards.clip(str(folder["clip"])), rewards.pickscore(str(folder["pickscore"]))
    torch.testing.assert_close(pick(x, PROMPTS), refs["clip"].logit_scale.exp().item() * clip(x, PROMPTS))


def test_hpsv3_loader_reproduces_the_tiny_model(dirs):
    folder, refs = dirs
    model, head = refs["hpsv3"]
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(folder["hpsv3"])
    tok.add_tokens(["<|Reward|>"], special_tokens=True)
    x = images(2)
    pixels, grid = rewards.qwen2vl_pixels(x)
    mu = []
    for i, p in enumerate(PROMPTS[:2]):  # one at a time: no padding at all
        text = rewards.HPSV3_CHAT.format(image="<|image_pad|>" * (int(grid[i].prod()) // 4),
                                         text=rewards.HPSV3_INSTRUCTION.format(text_prompt=p))
        ids = tok(text, return_tensors="pt").input_ids
        rows = slice(i * int(grid[i].prod()), (i + 1) * int(grid[i].prod()))
        with torch.no_grad():
            h = model(input_ids=ids, pixel_values=pixels[rows], image_grid_thw=grid[i:i + 1],
                      mm_token_type_ids=(ids == model.config.image_token_id).int()).last_hidden_state
            mu.append(head(h[0, ids[0].tolist().index(len(tok) - 1)])[0])
    torch.testing.assert_close(rewards.hpsv3(str(folder["hpsv3"]))(x, PROMPTS[:2]), torch.stack(mu))


def test_hpsv3_prompt_is_the_published_one():
    # sha256 of HPSv3's INSTRUCTION + prompt_with_special_token (hpsv3/dataset/data_collator_qwen.py)
    text = rewards.HPSV3_INSTRUCTION
    assert text.count("<|Reward|>") == 1 and text.count("{text_prompt}") == 1
    assert hashlib.sha256(text.encode()).hexdigest() == HPSV3_PROMPT_SHA256


# ----------------------------------------------------------------------------- 2. the HPSv2.1 open_clip mapping
def open_clip_vit_h14_layout():
    """Every key and shape of an open_clip ViT-H-14 CLIP, from its structure: 32 x 1280 vision blocks (patch 14,
    224 px), 24 x 1024 text blocks over 77 tokens of a 49408-word vocabulary, 1024-d embedding."""
    shapes = {"positional_embedding": (77, 1024), "text_projection": (1024, 1024), "logit_scale": (),
              "token_embedding.weight": (49408, 1024), "ln_final.weight": (1024,), "ln_final.bias": (1024,),
              "visual.class_embedding": (1280,), "visual.positional_embedding": (257, 1280),
              "visual.proj": (1280, 1024),
              "visual.conv1.weight": (1280, 3, 14, 14)}
    for p in ("ln_pre", "ln_post"):
        shapes |= {f"visual.{p}.weight": (1280,), f"visual.{p}.bias": (1280,)}
    for prefix, width, layers in (("", 1024, 24), ("visual.", 1280, 32)):
        for i in range(layers):
            b = f"{prefix}transformer.resblocks.{i}."
            shapes |= {b + "attn.in_proj_weight": (3 * width, width), b + "attn.in_proj_bias": (3 * width,),
                       b + "attn.out_proj.weight": (width, width), b + "attn.out_proj.bias": (width,),
                       b + "mlp.c_fc.weight": (4 * width, width), b + "mlp.c_fc.bias": (4 * width,),
                       b + "mlp.c_proj.weight": (width, 4 * width), b + "mlp.c_proj.bias": (width,)}
            for ln in ("ln_1", "ln_2"):
                shapes |= {f"{b}{ln}.weight": (width,), f"{b}{ln}.bias": (width,)}
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def test_open_clip_mapping_covers_the_vit_h14_layout(tmp_path):
    from transformers import CLIPModel
    sd = open_clip_vit_h14_layout()
    assert len(sd) == 8 + 6 + 12 * (24 + 32)  # embeddings, projections, scale; 3 tower norms; 12 tensors a block
    mapped = rewards.open_clip_to_hf(sd)
    tok = clip_tokenizer(tmp_path / "tok")
    config = rewards._open_clip_config(sd, rewards.VIT_H_14["model_cfg"], tok)
    assert (config.vision_config.num_attention_heads, config.text_config.num_attention_heads) == (16, 16)
    vision = config.vision_config
    assert (vision.image_size, vision.patch_size, vision.hidden_act, config.projection_dim) == (224, 14, "gelu", 1024)
    with torch.device("meta"):
        expected = CLIPModel(config).state_dict()
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    with pytest.raises(UsageError, match="not part of an open_clip"):
        rewards.open_clip_to_hf({**sd, "visual.attn_pool.query": torch.empty(1, device="meta")})


@pytest.mark.parametrize("name", ["hpsv2", "clip_dfn"])
def test_open_clip_round_trip_reproduces_the_tiny_model(dirs, name):
    folder, refs = dirs
    x = images(3, 28, 28)  # already the tiny towers' size: no resampling, only normalisation
    pixels = (x - MEAN) / STD
    got = rewards.REWARDS[name](str(folder[name]))(x, PROMPTS[:3])
    hf = refs[name]  # the model the checkpoint was written from
    tok = clip_tokenizer(folder[name] / "_tok")
    t = tok(PROMPTS[:3], padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        img = F.normalize(hf.visual_projection(hf.vision_model(pixel_values=pixels).pooler_output), dim=-1)
        txt = F.normalize(hf.text_projection(hf.text_model(input_ids=t.input_ids).pooler_output), dim=-1)
        sd = torch.load(folder[name] / ("HPS_v2.1_compressed.pt" if name == "hpsv2" else "open_clip_pytorch_model.bin"))
        act = (lambda z: z * torch.sigmoid(1.702 * z)) if name == "clip_dfn" else F.gelu
        reference = open_clip_cosine(sd.get("state_dict", sd), pixels, t.input_ids, 3, 2, act)
    torch.testing.assert_close(got, (img * txt).sum(-1), rtol=1e-5, atol=1e-5)  # round trip
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)  # open_clip's own semantics


# ----------------------------------------------------------------------------- 3. preprocessing vs the PIL path
def to_pil(x):
    return Image.fromarray((x * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())


@pytest.mark.parametrize("h,w", [(64, 48), (50, 70), (37, 37), (300, 200)])
def test_preprocess_matches_pil_processors(h, w):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    x = (images(2, h, w, seed=h) * 255).round() / 255  # exactly representable in uint8, as decoded images are
    ref = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    want = torch.from_numpy(np.stack(ref([to_pil(i) for i in x])["pixel_values"]))
    got = rewards.preprocess(x, 28)
    assert got.shape == want.shape == (2, 3, 28, 28)
    gap = ((got - want) * STD).abs()  # in [0, 1] pixel units: PIL rounds to uint8 between and after its passes
    assert gap.max() < 1.5 / 255 and gap.mean() < 0.5 / 255
    # HPSv2's ResizeMaxSize on a tensor (torchvision = one antialiased interpolate): long side -> 28, short side
    # rounded, centred on black, then normalised
    s = 28 / max(h, w)
    oh, ow = round(h * s), round(w * s)
    small = F.interpolate(x, size=(oh, ow), mode="bicubic", antialias=True) if (oh, ow) != (h, w) else x
    canvas = torch.zeros(2, 3, 28, 28)
    canvas[..., (28 - oh) // 2:(28 - oh) // 2 + oh, (28 - ow) // 2:(28 - ow) // 2 + ow] = small
    torch.testing.assert_close(rewards.preprocess(x, 28, mode="longest"), (canvas - MEAN) / STD)
    # Qwen2-VL (HPSv3): PIL bicubic to smart_resize, then the processor normalises and cuts patches
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    qh, qw = rewards.smart_resize(h, w, 28, 64 * 28 * 28, 64 * 28 * 28)
    proc = Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280})
    ref = proc([to_pil(i).resize((qw, qh), Image.BICUBIC) for i in x], return_tensors="pt")
    pixels, grid = rewards.qwen2vl_pixels(x, min_pixels=64 * 28 * 28, max_pixels=64 * 28 * 28)
    assert torch.equal(grid, ref["image_grid_thw"])
    assert (pixels - ref["pixel_values"]).abs().max() * max(rewards.OPENAI_STD) < 1.5 / 255


def test_smart_resize_is_qwen2vls():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    for h, w in [(1024, 1024), (512, 512), (720, 1280), (40, 52), (1000, 333), (28, 28)]:
        assert rewards.smart_resize(h, w) == smart_resize(h, w, 28, rewards.HPSV3_PIXELS, rewards.HPSV3_PIXELS)
    assert rewards.smart_resize(1024, 1024) == (448, 448)  # 32 x 32 patches, 256 tokens after the 2 x 2 merge


def test_preprocess_is_exact_without_resampling():
    x = images(2, 28, 28)
    want = (x - MEAN) / STD
    for mode in ("shortest", "longest", "squash"):
        assert torch.equal(rewards.preprocess(x, 28, mode=mode), want)


# ----------------------------------------------------------------------------- 4. weight-free rewards
def test_jpeg_prefers_flat_images_and_incompressibility_the_reverse():
    flat, noise = torch.full((1, 3, 64, 64), 0.5), images(1, 64, 64)
    x = torch.cat([flat, noise])
    c, i = (rewards.REWARDS[f"jpeg_{k}"]()(x, ["", ""]) for k in ("compressibility", "incompressibility"))
    assert c[0] > c[1] and i[1] > i[0] and torch.equal(c, -i)


def test_toy_verifier_scores_rendered_ground_truth_one():
    import toy
    prompts = toy.sample_prompts("train", 8, seed=0)
    scores = rewards.REWARDS["toy"]()(toy.render(prompts, seed=0), prompts)
    assert scores.shape == (8,) and torch.equal(scores, torch.ones(8))
    assert rewards.REWARDS["toy"]()(torch.zeros(2, 3, 32, 32), prompts[:2]).max() < 1


def test_mix_sums_weighted_raw_scores_and_reports_components():
    mix = rewards.build_reward(["jpeg_compressibility", "jpeg_incompressibility:0.25"])
    x = images(3, 32, 32)
    total, parts = mix(x, [""] * 3)
    assert set(parts) == {"jpeg_compressibility", "jpeg_incompressibility"}
    torch.testing.assert_close(total, parts["jpeg_compressibility"] + 0.25 * parts["jpeg_incompressibility"])


# ----------------------------------------------------------------------------- 5. errors end in one line
def one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg and excinfo.value.__cause__ is None
    return msg


@pytest.mark.parametrize("name,file", [("hpsv3", "HPSv3.safetensors"), ("hpsv2", "HPS_v2.1_compressed.pt"),
                                       ("imagereward", "ImageReward.pt"), ("aesthetic", "aesthetic-model.pth"),
                                       ("pickscore", "CLIP model"), ("clip_dfn", "open_clip_pytorch_model.bin")])
def test_missing_weights_name_file_place_and_flag(tmp_path, name, file):
    with pytest.raises(UsageError) as e:
        rewards.build_reward([name], paths=[f"{name}={tmp_path}"])
    msg = one_line(e)
    assert file in msg and str(tmp_path) in msg and f"--reward-path {name}=DIR" in msg


def test_missing_hub_checkpoint_fails_fast_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(UsageError) as e:
        rewards.hpsv2()
    msg = one_line(e)
    assert time.perf_counter() - start < 5 and "xswu/HPSv2" in msg and "HPS_v2.1_compressed.pt" in msg
    assert "offline" in msg and "--reward-path hpsv2=DIR" in msg


@pytest.mark.parametrize("specs,paths,match", [
    (["hpsv4"], None, "unknown reward 'hpsv4'.*choose from hpsv3, hpsv2"),
    (["clip:lots"], None, "weight after ':' must be a number"),
    (["clip", "clip:2"], None, "give each reward once"),
    ([], None, "give each reward once"),
    (["toy"], ["toy"], "takes NAME=DIR"),
    (["toy"], ["clip=/x"], "names clip, which is not among"),
])
def test_bad_reward_flags_end_in_one_line(specs, paths, match):
    with pytest.raises(UsageError, match=match) as e:
        rewards.build_reward(specs, paths=paths)
    one_line(e)


HPSV3_PROMPT_SHA256 = "f6ee57479d4e9eee76b49c00dc962e1e696a5a2b3cc32cebd9b1fa76fe27502c"
