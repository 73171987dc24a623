"""
Reward models behind one signature, `fn(images, prompts) -> (N,) float tensor`, and their weighted mix.

    python train_grpo.py --reward hpsv3                          # GCPO's main table, the FLUX default
    python train_grpo.py --reward hpsv3 --reward clip_dfn:0.5    # sum of weight * raw score, each part logged

`images` is a float tensor (N, 3, H, W) in [0, 1] on any device; each reward scores the whole batch there.
`REWARDS` maps a name to a factory `factory(path=None, *, device, dtype) -> fn` that loads its model when
called, from a hub id, a local folder (`--reward-path NAME=DIR`) or the checkpoint file itself (`NAME=FILE`),
offline first; a folder's missing config or tokenizer comes from the repo named in the table.
plumbing/reward_loading.py loads the published checkpoints into transformers modules and
plumbing/reward_inputs.py prepares their pixels and text, without the rewards' own packages.

name         checkpoint (default source)                       dtype  score, as reported here
hpsv3        MizzenAI/HPSv3 HPSv3.safetensors (Qwen2-VL-7B)    dtype  mu of the (mu, sigma) head at <|Reward|>
hpsv2        xswu/HPSv2 HPS_v2.1_compressed.pt (ViT-H-14)      fp32   cosine(image, text), no logit scale
pickscore    yuvalkirstain/PickScore_v1 + CLIP-H's tokenizer   fp32   logit_scale.exp() * cosine (~100 cosine)
clip         openai/clip-vit-large-patch14                     fp32   cosine(image, text)
clip_dfn     apple/DFN5B-CLIP-ViT-H-14-384 (GCPO's CLIP)       fp32   cosine(image, text)
aesthetic    trl-lib/ddpo-aesthetic-predictor + CLIP ViT-L/14  fp32   LAION MLP on the unit image embedding
imagereward  THUDM/ImageReward ImageReward.pt (BLIP + BERT)    fp32   (MLP(text [CLS]) - mean) / std
jpeg_compressibility, jpeg_incompressibility (no weights)             -/+ JPEG size in kB at quality 95 (DDPO)
toy          toy.verify (no weights)                                  fraction of the prompt's atoms right

Precision follows the official code: HPSv3 runs in the `dtype` given (bf16 on GPUs, as HPSv3 does; its head
in fp32), the others in fp32 whatever `dtype` is (PickScore and ImageReward score in fp32, HPSv2 under fp16
autocast over fp32 weights): bf16 moves a CLIP cosine by ~1e-3, a real part of a group's reward spread, and
these models are cheap next to the policy.

Scales differ between repos: GCPO (arXiv 2510.21583) trains on PickScore's raw cosine (ours / 100),
Flow-GRPO (github yifan123/flow_grpo) divides it by 26. Group-normalised advantages do not see one reward's
scale; a mix does, so weights apply to raw scores.
"""

import io
import json
import math
import os
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from plumbing.reward_inputs import clip_tokens, hpsv3_texts, open_clip_tokens, preprocess, qwen2vl_pixels
from plumbing.reward_loading import (
    PATH_FLAG,
    VIT_H_14,
    fetch,
    from_state_dict,
    imagereward_towers,
    load_tokenizer,
    local_folder,
    mlp_head,
    open_clip_config,
    open_clip_to_hf,
    pretrained,
    qwen2vl_key,
)
from plumbing.runtime import UsageError

RewardFn = Callable[[torch.Tensor, list[str]], torch.Tensor]  # (N, 3, H, W) in [0, 1], N prompts -> (N,)
HPSV3_REPO, QWEN2VL_REPO = "MizzenAI/HPSv3", "Qwen/Qwen2-VL-7B-Instruct"  # HPSv3 ships weights only
# HPSv2 and DFN5B are open_clip checkpoints, tokenised by the CLIP BPE of CLIP_H_REPO (PickScore's processor).
HPSV2_REPO, DFN_REPO = "xswu/HPSv2", "apple/DFN5B-CLIP-ViT-H-14-384"
CLIP_H_REPO, AESTHETIC_REPO = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "trl-lib/ddpo-aesthetic-predictor"
PICKSCORE_REPO, CLIP_REPO = "yuvalkirstain/PickScore_v1", "openai/clip-vit-large-patch14"
IMAGEREWARD_REPO, BERT_REPO = "THUDM/ImageReward", "google-bert/bert-base-uncased"
IMAGEREWARD_MEAN, IMAGEREWARD_STD = 0.16717362830052426, 1.0333394966054072  # ImageReward.py's, not in .pt


# ----------------------------------------------------------------------------- CLIP-family rewards
# "The CLIP model" in a folder: what CLIPModel.from_pretrained reads (or pytorch_model.bin for the weights).
CLIP_FILES = ("config.json", "model.safetensors")


def _cosine_reward(model, tokens, pre, scale: float = 1.0) -> RewardFn:
    """scale * cosine(image, text) of a transformers CLIPModel; `tokens(prompts)` -> (ids, mask or None)"""

    @torch.no_grad()
    def score(images, prompts):
        ids, mask = tokens(prompts)  # (N, L) each
        ids, mask = ids.to(model.device), None if mask is None else mask.to(model.device)
        img = model.vision_model(pixel_values=pre(images.to(model.device))).pooler_output  # (N, D)
        txt = model.text_model(input_ids=ids, attention_mask=mask).pooler_output  # (N, D)
        img = F.normalize(model.visual_projection(img), dim=-1)  # (N, E)
        txt = F.normalize(model.text_projection(txt), dim=-1)  # (N, E)
        return (scale * (img * txt).sum(-1)).to(images.device)  # (N,)

    return score


def _hf_clip(reward, src, base, device):
    """A transformers CLIPModel in fp32 from the folder or hub repo `src` (else `base`) and its preprocessing
    (the CLIPImageProcessor of these repos: short side 224 bicubic, centre crop 224, OpenAI mean and std)."""
    from transformers import CLIPModel

    model = pretrained(reward, CLIPModel, src, "the CLIP model", CLIP_FILES, base, dtype=torch.float32)
    return model.to(device).eval(), partial(preprocess, size=model.config.vision_config.image_size)


def _open_clip(reward, src, repo, filename, default_cfg, device):
    """An open_clip checkpoint in a transformers CLIPModel (`open_clip_to_hf`) in fp32, tokenised as open_clip
    does with the CLIP BPE; `repo`: the default repo, whose open_clip_config.json a folder may lack."""
    from transformers import CLIPModel

    weights = fetch(reward, src, filename)
    cfg, folder = default_cfg, local_folder(src)
    if cfg is None or (folder and os.path.isfile(os.path.join(folder, "open_clip_config.json"))):
        with open(fetch(reward, src, "open_clip_config.json", repo)) as f:
            cfg = json.load(f)
    tok = load_tokenizer(reward, src, CLIP_H_REPO)
    sd = torch.load(weights, map_location="cpu", weights_only=True)
    sd = sd.get("state_dict", sd)  # HPSv2 saves a training checkpoint around it
    config = open_clip_config(sd, cfg["model_cfg"], tok)
    model = from_state_dict(reward, CLIPModel, config, open_clip_to_hf(sd), torch.float32).to(device)
    p = cfg.get("preprocess_cfg", {})  # what it leaves out is preprocess's default: OpenAI mean, std, bicubic
    given = {k: p[k] for k in ("mean", "std", "interpolation") if k in p}
    mode = p.get("resize_mode", "shortest")
    pre = partial(preprocess, size=config.vision_config.image_size, mode=mode, **given)
    return model, partial(open_clip_tokens, tok, config.text_config.max_position_embeddings), pre


def pickscore(path=None, *, device="cpu", dtype=torch.float32) -> RewardFn:
    """PickScore v1 (CLIP-H tuned on Pick-a-Pic) as its paper reports it: logit_scale.exp() * cosine."""
    src = path or PICKSCORE_REPO
    model, pre = _hf_clip("pickscore", src, None, device)
    tok = load_tokenizer("pickscore", src, CLIP_H_REPO)
    tokens = partial(clip_tokens, tok, model.config.text_config.max_position_embeddings)
    return _cosine_reward(model, tokens, pre, scale=model.logit_scale.exp().item())


def clip(path=None, *, device="cpu", dtype=torch.float32) -> RewardFn:
    """CLIP score: cosine(image, text) of openai CLIP ViT-L/14."""
    src = path or CLIP_REPO
    model, pre = _hf_clip("clip", src, None, device)
    tok = load_tokenizer("clip", src, CLIP_REPO)
    tokens = partial(clip_tokens, tok, model.config.text_config.max_position_embeddings)
    return _cosine_reward(model, tokens, pre)


def clip_dfn(path=None, *, device="cpu", dtype=torch.float32) -> RewardFn:
    """GCPO's CLIP score: cosine(image, text) of Apple's DFN5B CLIP ViT-H-14 (378 px, QuickGELU)."""
    args = ("open_clip_pytorch_model.bin", None, device)
    return _cosine_reward(*_open_clip("clip_dfn", path or DFN_REPO, DFN_REPO, *args))


def hpsv2(path=None, *, device="cpu", dtype=torch.float32) -> RewardFn:
    """HPSv2.1: cosine(image, text) of an open_clip ViT-H-14 tuned on HPD v2, without logit scale (~0.3)."""
    args = ("HPS_v2.1_compressed.pt", VIT_H_14, device)
    return _cosine_reward(*_open_clip("hpsv2", path or HPSV2_REPO, HPSV2_REPO, *args))


def aesthetic(path=None, *, device="cpu", dtype=torch.float32) -> RewardFn:
    """LAION aesthetic predictor v2 (DDPO's reward): a linear MLP on the unit CLIP ViT-L/14 image embedding,
    from trl's aesthetic-model.pth or LAION's own sac+logos+ava1-l14-linearMSE.pth (the same state dict)."""
    src = path or AESTHETIC_REPO
    weights = fetch("aesthetic", src, ("aesthetic-model.pth", "sac+logos+ava1-l14-linearMSE.pth"))
    model, pre = _hf_clip("aesthetic", src, CLIP_REPO, device)
    # 768 -> 1024 -> 128 -> 64 -> 16 -> 1 with no activations, as it was trained
    head = mlp_head(torch.load(weights, weights_only=True), "layers.").to(device)

    @torch.no_grad()
    def score(images, prompts):
        img = model.vision_model(pixel_values=pre(images.to(device))).pooler_output  # (N, D)
        img = F.normalize(model.visual_projection(img), dim=-1)  # (N, E)
        return head(img).squeeze(1).to(images.device)  # (N,)

    return score


# ----------------------------------------------------------------------------- BLIP and Qwen2-VL rewards
def imagereward(path=None, *, device="cpu", dtype=torch.float32) -> RewardFn:
    """ImageReward v1.0 in fp32: BLIP's ViT-L/16 reads the image, its BERT reads the prompt cross-attending to
    the image, and an MLP on the [CLS] state gives the reward, standardised by the published mean and std."""
    src = path or IMAGEREWARD_REPO
    weights = fetch("imagereward", src, "ImageReward.pt")
    with open(fetch("imagereward", src, "med_config.json", IMAGEREWARD_REPO)) as f:
        med = json.load(f)  # the text encoder's BERT-base sizes
    tok = load_tokenizer("imagereward", src, BERT_REPO)
    sd = torch.load(weights, weights_only=True)
    vision, text = imagereward_towers(sd, med, torch.float32)
    vision, text = vision.to(device), text.to(device)
    head = mlp_head(sd, "mlp.layers.").to(device)  # 768 -> 1024 -> 128 -> 64 -> 16 -> 1, no activations
    pre = partial(preprocess, size=vision.config.image_size)  # torchvision Resize(224) + CenterCrop, OpenAI's

    @torch.no_grad()
    def score(images, prompts):
        img = vision(pixel_values=pre(images.to(device))).last_hidden_state  # (N, 1 + P, D) image states
        # ImageReward pads every prompt to 35 tokens and cuts longer ones there.
        t = tok(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt").to(device)
        # the text tower has cross-attention layers (is_decoder=True) but reads the prompt bidirectionally
        ids, mask = t.input_ids, t.attention_mask  # (N, 35)
        states = text(input_ids=ids, attention_mask=mask, encoder_hidden_states=img, is_decoder=False)
        cls = states.last_hidden_state[:, 0]  # (N, D) the [CLS] state
        return ((head(cls).squeeze(1) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD).to(images.device)  # (N,)

    return score


def hpsv3(path=None, *, device="cpu", dtype=torch.float32) -> RewardFn:
    """HPSv3: Qwen2-VL-7B reads the image and HPSv3's instruction; a head on the hidden state of the added
    <|Reward|> token predicts the (mu, sigma) of a Gaussian preference score. The reward is mu."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, Qwen2VLModel

    src = path or HPSV3_REPO
    # Found first, read last: a folder that lacks the weights says so before the small files are looked for.
    weights = fetch("hpsv3", src, "HPSv3.safetensors")
    config = pretrained("hpsv3", AutoConfig, src, "the Qwen2-VL config", ("config.json",), QWEN2VL_REPO)
    tok = load_tokenizer("hpsv3", src, QWEN2VL_REPO)
    tok.add_tokens(["<|Reward|>"], special_tokens=True)  # as HPSv3, which then shrank the embeddings to fit
    tok.padding_side = "right"  # as HPSv3; under causal attention <|Reward|> cannot see the padding after it
    reward_id = tok.convert_tokens_to_ids("<|Reward|>")
    sd = load_file(weights, device=str(device))  # to the device: 16 GB
    # lm_head is dropped: the reward reads hidden states, never logits (1 GB saved in bf16).
    backbone = {qwen2vl_key(k): v for k, v in sd.items() if not k.startswith(("rm_head.", "lm_head."))}
    config.text_config.vocab_size = backbone["language_model.embed_tokens.weight"].shape[0]
    model = from_state_dict("hpsv3", Qwen2VLModel, config, backbone, dtype).to(device)
    # Linear-ReLU-Linear-ReLU-Linear -> (mu, sigma), fp32 as HPSv3 keeps it (its dropout is off at inference)
    head = mlp_head({k[8:]: v for k, v in sd.items() if k.startswith("rm_head.")}, "", torch.nn.ReLU)
    head = head.to(device)
    vc = config.vision_config

    @torch.no_grad()
    def score(images, prompts):
        sizes = (vc.patch_size, vc.spatial_merge_size, vc.temporal_patch_size)
        pixels, grid = qwen2vl_pixels(images.to(device), *sizes)  # (N gh gw, 3 T p^2), (N, 3)
        texts = hpsv3_texts(prompts, int(grid[0].prod()) // vc.spatial_merge_size**2)  # 256 pads at 448 px
        t = tok(texts, padding=True, return_tensors="pt").to(device)  # (N, L), right-padded
        # HPSv3 calls the language model with position_ids=None, which transformers 4.45 (HPSv3's) read as
        # arange(L) in all three M-RoPE sections, the image tokens' too (modeling_qwen2_vl.py,
        # Qwen2VLModel.forward); given none, 5.x would build M-RoPE positions from the image grid instead.
        positions = torch.arange(t.input_ids.shape[1], device=device).expand(3, len(prompts), -1)  # (3, N, L)
        text = dict(input_ids=t.input_ids, attention_mask=t.attention_mask, position_ids=positions)
        image = dict(pixel_values=pixels.to(dtype), image_grid_thw=grid)
        hidden = model(**text, **image, use_cache=False).last_hidden_state  # (N, L, D)
        at = (t.input_ids == reward_id).int().argmax(1)  # (N,) position of <|Reward|>
        mu_sigma = head(hidden[torch.arange(len(prompts), device=device), at].float())  # (N, 2)
        return mu_sigma[:, 0].to(images.device)  # (N,)

    return score


# ----------------------------------------------------------------------------- weight-free rewards
def jpeg(path=None, *, device="cpu", dtype=torch.float32, sign=-1.0) -> RewardFn:
    """DDPO's sign * (size in kB of the image as a quality-95 JPEG), encoded in memory; -1: compressibility"""
    from PIL import Image

    def score(images, prompts):
        pixels = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8)  # (N, 3, H, W)
        pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()  # (N, H, W, 3)
        sizes = []
        for a in pixels:  # JPEG has no batched encoder: the one per-image loop here (~4 ms at 512 px)
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="JPEG", quality=95)
            sizes.append(sign * buf.tell() / 1000)
        return torch.tensor(sizes, device=images.device)  # (N,)

    return score


def toy_verifier(path=None, *, device="cpu", dtype=torch.float32) -> RewardFn:
    """toy.verify: the fraction of the prompt's atoms (object, colour, count, position) rendered right."""
    from plumbing import toy

    def score(images, prompts):
        return toy.verify(images.detach().float().cpu(), prompts).score.float().to(images.device)  # (N,)

    return score


# ----------------------------------------------------------------------------- registry and mix
REWARDS: dict[str, Callable[..., RewardFn]] = {
    "hpsv3": hpsv3,
    "hpsv2": hpsv2,
    "pickscore": pickscore,
    "clip": clip,
    "clip_dfn": clip_dfn,
    "aesthetic": aesthetic,
    "imagereward": imagereward,
    "jpeg_compressibility": partial(jpeg, sign=-1.0),
    "jpeg_incompressibility": partial(jpeg, sign=1.0),
    "toy": toy_verifier,
}


def parse_reward_specs(specs: list[str]) -> list[tuple[str, float]]:
    """["hpsv3", "clip:0.5"] -> [("hpsv3", 1.0), ("clip", 0.5)]: NAME or NAME:WEIGHT, each name once."""
    names = ", ".join(REWARDS)
    out = []
    for spec in specs:
        name, _, weight = spec.partition(":")
        if name not in REWARDS:
            raise UsageError(f"unknown reward {name!r} in --reward {spec}; choose from {names}")
        try:
            w = float(weight or 1.0)
        except ValueError:
            w = math.nan
        if not math.isfinite(w):
            raise UsageError(
                f"--reward {spec}: the weight after ':' must be a finite number, e.g. {name}:0.5"
            )
        out.append((name, w))
    if not out or len({n for n, _ in out}) != len(out):
        given = " ".join(specs) or "(none)"
        raise UsageError(f"--reward {given}: give each reward once, as NAME or NAME:WEIGHT (NAME in {names})")
    return out


def build_reward(specs: list[str], *, device="cpu", dtype=torch.float32, paths=None):
    """The weighted mix: fn(images, prompts) -> (total (N,), {name: raw score (N,)}); total = sum(w * raw)

    `paths`: {name: hub id, folder or file}, or the CLI's ["name=DIR", ...]; other rewards load their default
    checkpoint. Raw scores are summed as Flow-GRPO does (MixGRPO's per-reward advantages would need the group
    ids here).
    """
    parsed = parse_reward_specs(specs)
    if isinstance(paths, (list, tuple)):
        if not all("=" in p for p in paths):
            example = f"{PATH_FLAG} hpsv3=/models/HPSv3"
            raise UsageError(
                f"{PATH_FLAG} takes NAME=DIR or NAME=FILE, e.g. {example}; got {' '.join(paths)}"
            )
        paths = dict(p.split("=", 1) for p in paths)
    paths = paths or {}
    if unknown := sorted(set(paths) - {n for n, _ in parsed}):
        given = " ".join(specs)
        raise UsageError(f"{PATH_FLAG} names {', '.join(unknown)}, which is not among --reward {given}")
    fns = {name: REWARDS[name](paths.get(name), device=device, dtype=dtype) for name, _ in parsed}

    @torch.no_grad()
    def mix(images, prompts):
        parts = {name: fns[name](images, prompts).float() for name, _ in parsed}  # name -> (N,)
        return sum(w * parts[name] for name, w in parsed), parts

    return mix
