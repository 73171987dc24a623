"""rewards.py: tiny random reward models written in each checkpoint's real on-disk format and loaded through
the real loaders (folders, single files, fp32 whatever dtype), HPSv3 against a transcription of HPSv3's own
forward, the weight-free rewards, the mix and the one-line errors, which name the files to fetch. Nothing is
downloaded. The key maps are tested in test_reward_loading.py, pixels and text in test_reward_inputs.py."""

import hashlib
import time

import pytest
import torch

import rewards
from plumbing import reward_inputs
from plumbing.reward_inputs import hpsv3_texts, qwen2vl_pixels
from plumbing.reward_loading import TOKENIZER_FILES
from plumbing.runtime import UsageError
from test_reward_loading import PROMPTS, clip_tokenizer, imagereward_dir, images, tiny_clip, write_open_clip

CHECKPOINTED = ["pickscore", "clip", "clip_dfn", "hpsv2", "aesthetic", "imagereward", "hpsv3"]
HPSV3_PROMPT_SHA256 = "f6ee57479d4e9eee76b49c00dc962e1e696a5a2b3cc32cebd9b1fa76fe27502c"


# ----------------------------------------------------------------------------- tiny tokenizers, offline
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
    tok.train_from_iterator([reward_inputs.HPSV3_INSTRUCTION, reward_inputs.HPSV3_CHAT] + PROMPTS, trainer)
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
    # fp32 whatever dtype the trainer passes, except HPSv3, which runs in it: as their official code does
    bf16 = rewards.REWARDS[name](str(dirs[0][name]), dtype=torch.bfloat16)(x, PROMPTS)
    assert torch.equal(bf16, scores) == (name != "hpsv3")


def test_single_files_and_laions_aesthetic_name_load_as_folders(dirs, tmp_path):
    folder, x = dirs[0], images()
    files = {
        "hpsv3": "HPSv3.safetensors",
        "hpsv2": "HPS_v2.1_compressed.pt",
        "clip_dfn": "open_clip_pytorch_model.bin",
        "imagereward": "ImageReward.pt",
    }
    for name, file in files.items():
        fn = rewards.REWARDS[name]
        assert torch.equal(fn(str(folder[name] / file))(x, PROMPTS), fn(str(folder[name]))(x, PROMPTS)), name
    # LAION's own file name for the aesthetic head (improved-aesthetic-predictor), beside the CLIP it reads
    for f in folder["aesthetic"].iterdir():
        laion = "sac+logos+ava1-l14-linearMSE.pth" if f.name == "aesthetic-model.pth" else f.name
        (tmp_path / laion).symlink_to(f)
    want = rewards.aesthetic(str(folder["aesthetic"]))(x, PROMPTS)
    assert torch.equal(rewards.aesthetic(str(tmp_path))(x, PROMPTS), want)
    assert torch.equal(
        rewards.aesthetic(str(tmp_path / "sac+logos+ava1-l14-linearMSE.pth"))(x, PROMPTS), want
    )


def test_pickscore_is_logit_scaled_clip_cosine(dirs):
    folder, refs = dirs
    x = images()
    clip, pick = rewards.clip(str(folder["clip"])), rewards.pickscore(str(folder["pickscore"]))
    torch.testing.assert_close(pick(x, PROMPTS), refs["clip"].logit_scale.exp().item() * clip(x, PROMPTS))


def hpsv3_reference(model, head, tok, x, prompts, mrope=False):
    """HPSv3's reward as its inferencer computes it (MizzenAI/HPSv3, hpsv3/inference.py and
    hpsv3/model/qwen2vl_trainer.py, Qwen2VLRewardModelBT.forward) on a right-padded batch: the image features
    replace the <|image_pad|> embeddings, the language model runs with position_ids=None, which transformers
    4.45 (modeling_qwen2_vl.py, Qwen2VLModel.forward) makes arange(L) in all three M-RoPE sections (the 5.x
    text model too), and the fp32 head reads the state at <|Reward|>. mrope=True: 5.x's 3-D positions."""
    pixels, grid = qwen2vl_pixels(x)
    t = tok(hpsv3_texts(prompts, int(grid[0].prod()) // 4), padding=True, return_tensors="pt")
    image_tokens = t.input_ids == model.config.image_token_id  # (N, L)
    with torch.no_grad():
        if mrope:  # what rewards.hpsv3 did before: 5.x builds M-RoPE positions from the image grid
            mm = dict(image_grid_thw=grid, mm_token_type_ids=image_tokens.int())
            out = model(input_ids=t.input_ids, attention_mask=t.attention_mask, pixel_values=pixels, **mm)
            hidden = out.last_hidden_state
        else:
            embeds = model.language_model.embed_tokens(t.input_ids)  # (N, L, D)
            image = model.visual(pixels, grid_thw=grid).pooler_output  # (N * 256, D)
            embeds = embeds.masked_scatter(image_tokens[..., None].expand_as(embeds), image)
            lm = model.language_model(
                inputs_embeds=embeds, attention_mask=t.attention_mask, position_ids=None
            )
            hidden = lm.last_hidden_state  # (N, L, D)
        return head(hidden[t.input_ids == tok.convert_tokens_to_ids("<|Reward|>")].float())[:, 0]  # (N,)


def test_hpsv3_scores_as_hpsv3s_own_forward(dirs):
    from transformers import AutoTokenizer

    folder, refs = dirs
    model, head = refs["hpsv3"]
    tok = AutoTokenizer.from_pretrained(folder["hpsv3"], padding_side="right")
    tok.add_tokens(["<|Reward|>"], special_tokens=True)
    x, prompts = images(4), PROMPTS[::-1]  # prompts of different lengths: right padding in the batch
    want = hpsv3_reference(model, head, tok, x, prompts)
    got = rewards.hpsv3(str(folder["hpsv3"]))(x, prompts)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the test can tell: 3-D image positions (what rewards.hpsv3 scored with before) are ~6e-5 away here
    assert (hpsv3_reference(model, head, tok, x, prompts, mrope=True) - want).abs().max() > 2e-5


def test_hpsv3_prompt_is_the_published_one():
    # sha256 of HPSv3's INSTRUCTION + prompt_with_special_token (hpsv3/dataset/data_collator_qwen.py)
    text = reward_inputs.HPSV3_INSTRUCTION
    assert text.count("<|Reward|>") == 1 and text.count("{text_prompt}") == 1
    assert hashlib.sha256(text.encode()).hexdigest() == HPSV3_PROMPT_SHA256


# ----------------------------------------------------------------------------- 2. weight-free rewards
def test_jpeg_prefers_flat_images_and_incompressibility_the_reverse():
    flat, noise = torch.full((1, 3, 64, 64), 0.5), images(1, 64, 64)
    x = torch.cat([flat, noise])
    c, i = (rewards.REWARDS[f"jpeg_{k}"]()(x, ["", ""]) for k in ("compressibility", "incompressibility"))
    assert c[0] > c[1] and i[1] > i[0] and torch.equal(c, -i)


def test_toy_verifier_scores_rendered_ground_truth_one():
    from plumbing import toy

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


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No hub and an empty Hugging Face cache (returned): whatever a folder lacks cannot be found."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    return tmp_path / "hf_cache"


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
def test_missing_weights_name_file_place_and_flag(tmp_path, offline, name, file):
    with pytest.raises(UsageError) as e:
        rewards.build_reward([name], paths=[f"{name}={tmp_path}"])
    msg = one_line(e)
    assert file in msg and str(tmp_path) in msg and f"--reward-path {name}=DIR" in msg and "=FILE" in msg


def test_weights_only_folder_names_the_small_files_to_add(dirs, tmp_path, offline):
    (tmp_path / "HPSv3.safetensors").symlink_to(dirs[0]["hpsv3"] / "HPSv3.safetensors")
    qwen = "hf download Qwen/Qwen2-VL-7B-Instruct"
    for missing, get in [("config.json", "config.json"), ("tokenizer", " ".join(TOKENIZER_FILES))]:
        with pytest.raises(UsageError) as e:
            rewards.hpsv3(str(tmp_path / "HPSv3.safetensors"))  # NAME=FILE: its folder is DIR
        msg = one_line(e)
        assert missing in msg and f"`{qwen} {get} --local-dir {tmp_path}`" in msg, msg
        if missing == "config.json":  # the config is found first, then the tokenizer, then the weights read
            (tmp_path / "config.json").symlink_to(dirs[0]["hpsv3"] / "config.json")
    (tmp_path / "HPS_v2.1_compressed.pt").symlink_to(dirs[0]["hpsv2"] / "HPS_v2.1_compressed.pt")
    with pytest.raises(UsageError) as e:
        rewards.hpsv2(str(tmp_path))
    assert f"laion/CLIP-ViT-H-14-laion2B-s32B-b79K {' '.join(TOKENIZER_FILES)}" in one_line(e)


def test_missing_hub_checkpoint_fails_fast_offline(offline):
    start = time.perf_counter()
    with pytest.raises(UsageError) as e:
        rewards.hpsv2()
    msg = one_line(e)
    assert time.perf_counter() - start < 5 and "`hf download xswu/HPSv2 HPS_v2.1_compressed.pt`" in msg
    assert "offline" in msg and "--reward-path hpsv2=DIR" in msg


def test_cached_hpsv3_without_qwen_config_names_only_the_config(dirs, offline):
    # HPSv3.safetensors in the HF cache (its layout: refs/main -> snapshots/<commit>/file), Qwen2-VL not
    repo, commit = offline / "models--MizzenAI--HPSv3", "0" * 40
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit / "HPSv3.safetensors").symlink_to(dirs[0]["hpsv3"] / "HPSv3.safetensors")
    with pytest.raises(UsageError) as e:
        rewards.hpsv3()
    msg = one_line(e)  # the config's one file, not the 16 GB repo
    assert "Qwen2-VL config" in msg and "(`hf download Qwen/Qwen2-VL-7B-Instruct config.json`)" in msg


@pytest.mark.parametrize(
    "specs,paths,match",
    [
        (["hpsv4"], None, "unknown reward 'hpsv4'.*choose from hpsv3, hpsv2"),
        (["clip:lots"], None, "weight after ':' must be a finite number"),
        (["clip", "clip:2"], None, "give each reward once"),
        ([], None, "give each reward once"),
        (["toy"], ["toy"], "takes NAME=DIR or NAME=FILE"),
        (["toy"], ["clip=/x"], "names clip, which is not among"),
    ],
)
def test_bad_reward_flags_end_in_one_line(specs, paths, match):
    with pytest.raises(UsageError, match=match) as e:
        rewards.build_reward(specs, paths=paths)
    one_line(e)
