"""plumbing/reward_loading.py: the open_clip key map (against the ViT-H-14 layout, and a round trip through
tiny HPSv2.1 and DFN5B checkpoints against an independent open_clip forward). Nothing is downloaded;
test_rewards.py and test_reward_inputs.py build their tiny checkpoints and tokenizers with these helpers."""

import json

import pytest
import torch
import torch.nn.functional as F

import rewards
from plumbing import reward_inputs, reward_loading
from plumbing.runtime import UsageError

WORDS = (
    "a an the red blue green yellow circle square triangle cat dog photo of on left right two three".split()
)
PROMPTS = ["a red circle", "two blue squares on the left of a green triangle", "a photo of a cat", "dog"]
MEAN = torch.tensor(reward_inputs.OPENAI_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(reward_inputs.OPENAI_STD).view(1, 3, 1, 1)
# The CLIP byte alphabet of the test tokenizer (the real one has all 256 bytes): "!" first, id 0, as there.
SYMBOLS = list("!\"#&'(),-.:;<>?|") + list("abcdefghijklmnopqrstuvwxyz")
# name -> (file, activation, preprocess_cfg beyond mean and std): HPSv2.1 saves {"state_dict": ...} in the
# ViT-H-14 layout; DFN5B a bare state dict, trained with QuickGELU.
OPEN_CLIP = {
    "hpsv2": ("HPS_v2.1_compressed.pt", "gelu", {"resize_mode": "longest"}),
    "clip_dfn": ("open_clip_pytorch_model.bin", "quick_gelu", {}),
}


def images(n=4, h=40, w=52, seed=0):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))  # (n, 3, h, w)


def clip_merges():
    """BPE merges that build each of WORDS left to right, in order (the real vocabulary has 48894)."""
    merges = []
    for word in WORDS:
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            merges.append((parts[0], parts[1]))
            parts = [parts[0] + parts[1], *parts[2:]]
    return list(dict.fromkeys(merges))


def clip_tokenizer(folder):
    """A CLIP BPE tokenizer laid out as the real one: the byte alphabet, then each symbol with </w>, then the
    merged tokens, then <|startoftext|> and <|endoftext|> (49406, 49407 there); laion's pad token "!"."""
    from transformers import CLIPTokenizer

    merges = clip_merges()
    tokens = SYMBOLS + [c + "</w>" for c in SYMBOLS] + ["".join(m) for m in merges]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens + ["<|startoftext|>", "<|endoftext|>"]))}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
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


def tiny_clip(tok, *, act="gelu", image=28):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    text = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, hidden_act=act
    )
    text |= dict(vocab_size=len(tok), max_position_embeddings=16, **ids)
    vision = dict(
        hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=3, hidden_act=act
    )
    vision |= dict(image_size=image, patch_size=14)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    with torch.no_grad():
        model.logit_scale.fill_(4.6)
    return model


def hf_to_open_clip(hf: dict) -> dict:
    """The test's own inverse of reward_loading.open_clip_to_hf from the open_clip layout's known structure"""
    sd = {
        "token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": hf["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": hf["text_model.final_layer_norm.weight"],
        "ln_final.bias": hf["text_model.final_layer_norm.bias"],
        "text_projection": hf["text_projection.weight"].t(),
        "logit_scale": hf["logit_scale"],
        "visual.class_embedding": hf["vision_model.embeddings.class_embedding"],
        "visual.positional_embedding": hf["vision_model.embeddings.position_embedding.weight"],
        "visual.conv1.weight": hf["vision_model.embeddings.patch_embedding.weight"],
        "visual.proj": hf["visual_projection.weight"].t(),
    }
    for ours, theirs in (("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post")):
        for p in ("weight", "bias"):
            sd[f"visual.{theirs}.{p}"] = hf[f"vision_model.{ours}.{p}"]
    names = {
        "ln_1": "layer_norm1",
        "ln_2": "layer_norm2",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
        "attn.out_proj": "self_attn.out_proj",
    }
    for tower, prefix in (("text_model", ""), ("vision_model", "visual.")):
        i = 0
        while f"{tower}.encoder.layers.{i}.layer_norm1.weight" in hf:
            a, b = f"{tower}.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
            for p in ("weight", "bias"):
                sd[f"{b}attn.in_proj_{p}"] = torch.cat([hf[f"{a}self_attn.{x}_proj.{p}"] for x in "qkv"])
                for theirs, ours in names.items():
                    sd[f"{b}{theirs}.{p}"] = hf[f"{a}{ours}.{p}"]
            i += 1
    return {k: v.clone() for k, v in sd.items()}


def write_open_clip(folder, name):
    """A tiny open_clip checkpoint in `name`'s published layout, with its tokenizer and open_clip_config.json;
    returns the CLIPModel it was written from."""
    file, act, extra = OPEN_CLIP[name]
    hf = tiny_clip(clip_tokenizer(folder), act=act)
    sd = hf_to_open_clip(hf.state_dict())
    torch.save({"state_dict": sd} if name == "hpsv2" else sd, folder / file)
    model_cfg = {
        "quick_gelu": act == "quick_gelu",
        "vision_cfg": {"head_width": 16},
        "text_cfg": {"heads": 2},
    }
    mean_std = dict(mean=list(reward_inputs.OPENAI_MEAN), std=list(reward_inputs.OPENAI_STD))
    cfg = {"model_cfg": model_cfg, "preprocess_cfg": dict(extra, **mean_std)}
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    return hf


def imagereward_dir(folder):
    """ImageReward.pt: BLIP's timm ViT names under blip.visual_encoder, med.py BERT under blip.text_encoder,
    the head under mlp."""
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    torch.manual_seed(2)
    tok = bert_tokenizer(folder)
    sizes = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=1)
    vision = BlipVisionModel(BlipVisionConfig(**sizes, image_size=32, patch_size=16, layer_norm_eps=1e-6))
    med = dict(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    med |= dict(max_position_embeddings=40, layer_norm_eps=1e-12, hidden_act="gelu", pad_token_id=0)
    text = BlipTextModel(
        BlipTextConfig(**med, encoder_hidden_size=64, is_decoder=True), add_pooling_layer=False
    )
    (folder / "med_config.json").write_text(json.dumps(dict(med, encoder_width=64, add_cross_attention=True)))
    names = {
        "embeddings.class_embedding": "cls_token",
        "embeddings.position_embedding": "pos_embed",
        "embeddings.patch_embedding": "patch_embed.proj",
        "post_layernorm": "norm",
        "encoder.layers.": "blocks.",
        "layer_norm1": "norm1",
        "layer_norm2": "norm2",
        "self_attn.qkv": "attn.qkv",
        "self_attn.projection": "attn.proj",
    }
    sd = {}
    for k, v in vision.state_dict().items():
        for ours, theirs in names.items():
            k = k.replace(ours, theirs)
        sd["blip.visual_encoder." + k] = v
    sd.update({"blip.text_encoder." + k: v for k, v in text.state_dict().items()})
    sd["blip.text_encoder.embeddings.position_ids"] = torch.arange(40)[None]  # med.py saves this buffer
    sd["blip.vision_proj.weight"] = torch.zeros(8, 64)  # in the file, unused by the reward
    for i, (n, o) in zip((0, 2, 4, 6, 7), ((32, 16), (16, 8), (8, 8), (8, 4), (4, 1)), strict=True):
        sd[f"mlp.layers.{i}.weight"], sd[f"mlp.layers.{i}.bias"] = torch.randn(o, n) / n**0.5, torch.randn(o)
    torch.save(sd, folder / "ImageReward.pt")
    return folder


def open_clip_cosine(sd, pixels, tokens, vision_heads, text_heads, act=F.gelu):
    """open_clip's forward written from its structure (nn.MultiheadAttention weights), independent of
    transformers."""

    def ln(x, name):
        return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"])

    def blocks(x, prefix, heads, mask=None):  # x (L, N, D)
        i = 0
        while f"{prefix}{i}.ln_1.weight" in sd:
            p = {k[len(f"{prefix}{i}.") :]: v for k, v in sd.items() if k.startswith(f"{prefix}{i}.")}
            h = F.layer_norm(x, x.shape[-1:], p["ln_1.weight"], p["ln_1.bias"])
            # in_proj packs q, k, v; no bias_k, bias_v, zero attention or dropout; then out_proj
            w = (p["attn.in_proj_weight"], p["attn.in_proj_bias"], None, None, False, 0.0)
            w += (p["attn.out_proj.weight"], p["attn.out_proj.bias"])
            kwargs = dict(training=False, need_weights=False, attn_mask=mask)
            a, _ = F.multi_head_attention_forward(h, h, h, x.shape[-1], heads, *w, **kwargs)  # (L, N, D)
            x = x + a
            h = F.layer_norm(x, x.shape[-1:], p["ln_2.weight"], p["ln_2.bias"])
            h = act(F.linear(h, p["mlp.c_fc.weight"], p["mlp.c_fc.bias"]))
            x = x + F.linear(h, p["mlp.c_proj.weight"], p["mlp.c_proj.bias"])
            i += 1
        return x

    patch = sd["visual.conv1.weight"].shape[-1]
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=patch).flatten(2).transpose(1, 2)  # (N, P, D)
    x = (
        torch.cat([sd["visual.class_embedding"].expand(len(x), 1, -1), x], 1)
        + sd["visual.positional_embedding"]
    )
    x = blocks(ln(x, "visual.ln_pre").transpose(0, 1), "visual.transformer.resblocks.", vision_heads)
    img = ln(x.transpose(0, 1)[:, 0], "visual.ln_post") @ sd["visual.proj"]  # (N, E)
    t = sd["token_embedding.weight"][tokens] + sd["positional_embedding"][: tokens.shape[1]]  # (N, L, D)
    causal = torch.full((tokens.shape[1],) * 2, float("-inf")).triu(1)
    t = ln(
        blocks(t.transpose(0, 1), "transformer.resblocks.", text_heads, causal).transpose(0, 1), "ln_final"
    )
    txt = t[torch.arange(len(t)), tokens.argmax(-1)] @ sd["text_projection"]  # (N, E)
    return (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)


@pytest.fixture(scope="module")
def open_clip_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("open_clip")
    return {name: (root / name, write_open_clip(root / name, name)) for name in OPEN_CLIP}


# ----------------------------------------------------------------------------- the open_clip key map
def open_clip_vit_h14_layout():
    """Every key and shape of an open_clip ViT-H-14 CLIP, from its structure: 32 x 1280 vision blocks (patch
    14, 224 px), 24 x 1024 text blocks over 77 tokens of a 49408-word vocabulary, 1024-d embedding."""
    shapes = {
        "positional_embedding": (77, 1024),
        "text_projection": (1024, 1024),
        "logit_scale": (),
        "token_embedding.weight": (49408, 1024),
        "ln_final.weight": (1024,),
        "ln_final.bias": (1024,),
        "visual.class_embedding": (1280,),
        "visual.positional_embedding": (257, 1280),
        "visual.proj": (1280, 1024),
        "visual.conv1.weight": (1280, 3, 14, 14),
    }
    for p in ("ln_pre", "ln_post"):
        shapes |= {f"visual.{p}.weight": (1280,), f"visual.{p}.bias": (1280,)}
    for prefix, width, layers in (("", 1024, 24), ("visual.", 1280, 32)):
        for i in range(layers):
            b = f"{prefix}transformer.resblocks.{i}."
            shapes |= {b + "attn.in_proj_weight": (3 * width, width), b + "attn.in_proj_bias": (3 * width,)}
            shapes |= {b + "attn.out_proj.weight": (width, width), b + "attn.out_proj.bias": (width,)}
            shapes |= {b + "mlp.c_fc.weight": (4 * width, width), b + "mlp.c_fc.bias": (4 * width,)}
            shapes |= {b + "mlp.c_proj.weight": (width, 4 * width), b + "mlp.c_proj.bias": (width,)}
            for ln in ("ln_1", "ln_2"):
                shapes |= {f"{b}{ln}.weight": (width,), f"{b}{ln}.bias": (width,)}
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def test_open_clip_mapping_covers_the_vit_h14_layout(tmp_path):
    from transformers import CLIPModel

    sd = open_clip_vit_h14_layout()
    assert len(sd) == 8 + 6 + 12 * (
        24 + 32
    )  # embeddings, projections, scale; 3 tower norms; 12 tensors a block
    mapped = reward_loading.open_clip_to_hf(sd)
    tok = clip_tokenizer(tmp_path / "tok")
    config = reward_loading.open_clip_config(sd, reward_loading.VIT_H_14["model_cfg"], tok)
    assert (config.vision_config.num_attention_heads, config.text_config.num_attention_heads) == (16, 16)
    vision = config.vision_config
    assert (vision.image_size, vision.patch_size, vision.hidden_act, config.projection_dim) == (
        224,
        14,
        "gelu",
        1024,
    )
    with torch.device("meta"):
        expected = CLIPModel(config).state_dict()
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    with pytest.raises(UsageError, match="not part of an open_clip"):
        reward_loading.open_clip_to_hf({**sd, "visual.attn_pool.query": torch.empty(1, device="meta")})


@pytest.mark.parametrize("name", sorted(OPEN_CLIP))
def test_open_clip_round_trip_reproduces_the_tiny_model(open_clip_dirs, name):
    folder, hf = open_clip_dirs[name]  # the folder and the model its checkpoint was written from
    x = images(3, 28, 28)  # already the tiny towers' size: no resampling, only normalisation
    pixels = (x - MEAN) / STD
    got = rewards.REWARDS[name](str(folder))(x, PROMPTS[:3])
    tok = clip_tokenizer(folder / "_tok")
    t = tok(PROMPTS[:3], padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        img = F.normalize(hf.visual_projection(hf.vision_model(pixel_values=pixels).pooler_output), dim=-1)
        txt = F.normalize(hf.text_projection(hf.text_model(input_ids=t.input_ids).pooler_output), dim=-1)
        sd = torch.load(folder / OPEN_CLIP[name][0])
        act = (lambda z: z * torch.sigmoid(1.702 * z)) if name == "clip_dfn" else F.gelu
        reference = open_clip_cosine(sd.get("state_dict", sd), pixels, t.input_ids, 3, 2, act)
    torch.testing.assert_close(got, (img * txt).sum(-1), rtol=1e-5, atol=1e-5)  # round trip
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)  # open_clip's own semantics
