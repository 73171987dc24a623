"""rewards.py: tiny random reward models written in each checkpoint's real on-disk format and loaded through
the real loaders, HPSv3 against its tiny model, the weight-free rewards, the mix and the one-line errors.
Nothing is downloaded. The key maps and the preprocessing are tested in test_reward_models.py."""

import hashlib
import json
import time

import pytest
import torch

import rewards
from reward_models import qwen2vl_pixels
from runtime import UsageError
from test_reward_models import PROMPTS, WORDS, clip_tokenizer, images, tiny_clip, write_open_clip

CHECKPOINTED = ["pickscore", "clip", "clip_dfn", "hpsv2", "aesthetic", "imagereward", "hpsv3"]
HPSV3_PROMPT_SHA256 = "f6ee57479d4e9eee76b49c00dc962e1e696a5a2b3cc32cebd9b1fa76fe27502c"


# ----------------------------------------------------------------------------- tiny tokenizers, offline
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
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"]
    specials += ["<|image_pad|>", "<|video_pad|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, show_progress=False, initial_alphabet=alphabet
    )
    tok.train_from_iterator([rewards.HPSV3_INSTRUCTION, rewards.HPSV3_CHAT] + PROMPTS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=specials[0], additional_special_tokens=specials[1:]
    )
    fast.save_pretrained(folder)
    return fast


# ----------------------------------------------------------------------------- tiny models, published layouts
@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """One folder per checkpoint-backed reward, each in the layout its published checkpoint uses."""
    root = tmp_path_factory.mktemp("rewards")
    out, refs = {}, {}
    # transformers-format CLIPs (PickScore, CLIP ViT-L/14) and the aesthetic MLP beside one
    out["pickscore"] = out["clip"] = out["aesthetic"] = root / "clip"
    refs["clip"] = tiny_clip(clip_tokenizer(root / "clip"))
    refs["clip"].save_pretrained(root / "clip")
    torch.manual_seed(1)
    head = {}
    for i, (n, o) in zip((0, 2, 4, 6, 7), ((16, 32), (32, 16), (16, 8), (8, 4), (4, 1)), strict=True):
        head |= {f"layers.{i}.weight": torch.randn(o, n), f"layers.{i}.bias": torch.randn(o)}
    torch.save(head, root / "clip" / "aesthetic-model.pth")
    # open_clip checkpoints: HPSv2.1 ({"state_dict": ...}, ViT-H-14 layout) and DFN5B (bare, QuickGELU)
    for name in ("hpsv2", "clip_dfn"):
        out[name] = root / name
        refs[name] = write_open_clip(root / name, name)
    out["imagereward"] = imagereward_dir(root / "imagereward")
    out["hpsv3"], refs["hpsv3"] = hpsv3_dir(root / "hpsv3")
    return out, refs


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


def hpsv3_dir(folder):
    """HPSv3.safetensors as transformers 4.45 saved it: model.* (LM), visual.*, lm_head, rm_head (ranknet)."""
    from safetensors.torch import save_file
    from transformers import Qwen2VLConfig, Qwen2VLModel

    torch.manual_seed(3)
    tok = qwen_tokenizer(folder)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>")}
    text = dict(vocab_size=len(tok) + 1, hidden_size=64, intermediate_size=96, num_hidden_layers=2)
    text |= dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    text |= dict(
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, bos_token_id=None, eos_token_id=None
    )
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
    )
    model = Qwen2VLModel(config).eval()
    config.save_pretrained(folder)
    nn = torch.nn  # HPSv3's "ranknet" head: rm_head.0, .3 and .5 are the Linear layers
    head = nn.Sequential(
        nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.05), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 2)
    )
    head.eval()
    sd = {}
    for k, v in model.state_dict().items():  # transformers 4.45 called the language model "model"
        sd["model." + k[len("language_model.") :] if k.startswith("language_model.") else k] = v
    sd["lm_head.weight"] = torch.randn(len(tok) + 1, 64)
    sd.update({"rm_head." + k: v for k, v in head.state_dict().items()})
    save_file({k: v.contiguous() for k, v in sd.items()}, folder / "HPSv3.safetensors")
    return folder, (model, head)


# ----------------------------------------------------------------------------- 1. checkpoint-backed rewards
@pytest.mark.parametrize("name", CHECKPOINTED)
def test_reward_loads_tiny_checkpoint_and_scores_batches(dirs, name):
    fn = rewards.REWARDS[name](str(dirs[0][name]))
    x = images()
    scores = fn(x, PROMPTS)
    assert scores.shape == (4,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    assert torch.equal(fn(x, PROMPTS), scores)  # deterministic
    assert scores.std() > 0  # the images and prompts are told apart
    singles = torch.cat([fn(x[i : i + 1], PROMPTS[i : i + 1]) for i in range(4)])
    pairs = torch.cat([fn(x[i : i + 2], PROMPTS[i : i + 2]) for i in (0, 2)])
    torch.testing.assert_close(singles, scores, rtol=1e-5, atol=1e-5)  # independent of batch size and padding
    torch.testing.assert_close(pairs, scores, rtol=1e-5, atol=1e-5)


def test_pickscore_is_logit_scaled_clip_cosine(dirs):
    folder, refs = dirs
    x = images()
    clip, pick = rewards.clip(str(folder["clip"])), rewards.pickscore(str(folder["pickscore"]))
    torch.testing.assert_close(pick(x, PROMPTS), refs["clip"].logit_scale.exp().item() * clip(x, PROMPTS))


def test_hpsv3_loader_reproduces_the_tiny_model(dirs):
    from transformers import AutoTokenizer

    folder, refs = dirs
    model, head = refs["hpsv3"]
    tok = AutoTokenizer.from_pretrained(folder["hpsv3"])
    tok.add_tokens(["<|Reward|>"], special_tokens=True)
    x = images(2)
    pixels, grid = qwen2vl_pixels(x)
    mu = []
    for i, p in enumerate(PROMPTS[:2]):  # one at a time: no padding at all
        pads = "<|image_pad|>" * (int(grid[i].prod()) // 4)
        text = rewards.HPSV3_CHAT.format(image=pads, text=rewards.HPSV3_INSTRUCTION.format(text_prompt=p))
        ids = tok(text, return_tensors="pt").input_ids
        rows = slice(i * int(grid[i].prod()), (i + 1) * int(grid[i].prod()))
        image_tokens = (ids == model.config.image_token_id).int()
        with torch.no_grad():
            out = model(
                input_ids=ids,
                pixel_values=pixels[rows],
                image_grid_thw=grid[i : i + 1],
                mm_token_type_ids=image_tokens,
            )
            mu.append(head(out.last_hidden_state[0, ids[0].tolist().index(len(tok) - 1)])[0])
    torch.testing.assert_close(rewards.hpsv3(str(folder["hpsv3"]))(x, PROMPTS[:2]), torch.stack(mu))


def test_hpsv3_prompt_is_the_published_one():
    # sha256 of HPSv3's INSTRUCTION + prompt_with_special_token (hpsv3/dataset/data_collator_qwen.py)
    text = rewards.HPSV3_INSTRUCTION
    assert text.count("<|Reward|>") == 1 and text.count("{text_prompt}") == 1
    assert hashlib.sha256(text.encode()).hexdigest() == HPSV3_PROMPT_SHA256


# ----------------------------------------------------------------------------- 2. weight-free rewards
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


# ----------------------------------------------------------------------------- 3. errors end in one line
def one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg and excinfo.value.__cause__ is None
    return msg


@pytest.mark.parametrize(
    "name,file",
    [
        ("hpsv3", "HPSv3.safetensors"),
        ("hpsv2", "HPS_v2.1_compressed.pt"),
        ("imagereward", "ImageReward.pt"),
        ("aesthetic", "aesthetic-model.pth"),
        ("pickscore", "CLIP model"),
        ("clip_dfn", "open_clip_pytorch_model.bin"),
    ],
)
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


@pytest.mark.parametrize(
    "specs,paths,match",
    [
        (["hpsv4"], None, "unknown reward 'hpsv4'.*choose from hpsv3, hpsv2"),
        (["clip:lots"], None, "weight after ':' must be a finite number"),
        (["clip", "clip:2"], None, "give each reward once"),
        ([], None, "give each reward once"),
        (["toy"], ["toy"], "takes NAME=DIR"),
        (["toy"], ["clip=/x"], "names clip, which is not among"),
    ],
)
def test_bad_reward_flags_end_in_one_line(specs, paths, match):
    with pytest.raises(UsageError, match=match) as e:
        rewards.build_reward(specs, paths=paths)
    one_line(e)
