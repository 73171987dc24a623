"""
Reward models behind one signature, `fn(images, prompts) -> (N,) float tensor`, and their weighted mix.

    python train_grpo.py --reward hpsv3                              # GCPO's main table, the FLUX default
    python train_grpo.py --reward hpsv3 --reward clip_dfn:0.5        # sum of weight * raw score, each part logged
    python train_grpo.py --reward pickscore --reward-path pickscore=/models/PickScore_v1      # a local copy

`images` is a float tensor (N, 3, H, W) in [0, 1] on any device. Each reward scores the whole batch on its device
under no_grad, with no PIL or disk round trip: resizing, cropping and normalising run in torch with the settings of
the model's published processor (`preprocess`, `qwen2vl_pixels`). `REWARDS` maps a name to a factory
`factory(path=None, *, device, dtype) -> fn` that imports and loads its model only when called; `path` is a hub id or
a local folder (`--reward-path NAME=DIR`). A hub id is read from the local Hugging Face cache first and fetched only
when the hub answers, so a machine without network stops at once with one line: the file, where it was looked for,
the flag to change.

name          checkpoint (default source)                                 score, as reported here
hpsv3         MizzenAI/HPSv3 HPSv3.safetensors (Qwen2-VL-7B + head)        mu of the head's (mu, sigma) at <|Reward|>
hpsv2         xswu/HPSv2 HPS_v2.1_compressed.pt (open_clip ViT-H-14)        cosine(image, text), no logit scale
pickscore     yuvalkirstain/PickScore_v1 + the laion CLIP-H processor      logit_scale.exp() * cosine (= 100 cosine)
clip          openai/clip-vit-large-patch14                                cosine(image, text)
clip_dfn      apple/DFN5B-CLIP-ViT-H-14-384 (open_clip; GCPO's CLIP runs)  cosine(image, text)
aesthetic     trl-lib/ddpo-aesthetic-predictor on CLIP ViT-L/14            LAION MLP on the unit image embedding
imagereward   THUDM/ImageReward ImageReward.pt (BLIP ViT-L/16 + BERT)      (MLP(text [CLS]) - mean) / std, as published
jpeg_compressibility, jpeg_incompressibility (no weights)                 -/+ JPEG size in kB at quality 95 (DDPO)
toy           toy.verify (no weights)                                      fraction of the prompt's atoms right

All are native: the published checkpoints load into transformers modules (CLIPModel, Qwen2VLModel, BlipVisionModel +
BlipTextModel) through explicit key maps, not through the hpsv2 / image-reward / hpsv3 packages and their pins.
Scales differ between repos (PAPERS.md s6): GCPO trains on PickScore's raw cosine (ours / 100) and Flow-GRPO divides
it by 26. Group-normalised advantages do not see one reward's scale; a mix does, so weights apply to raw scores.
"""
import io
import json
import math
import os
import re
import socket
from functools import partial
from typing import Callable
from urllib.parse import urlparse

import torch
import torch.nn.functional as F

from sampler import UsageError

RewardFn = Callable[[torch.Tensor, list[str]], torch.Tensor]  # (N, 3, H, W) in [0, 1], N prompts -> (N,)
PATH_FLAG = "--reward-path"
HPSV3_REPO, QWEN2VL_REPO = "MizzenAI/HPSv3", "Qwen/Qwen2-VL-7B-Instruct"  # HPSv3 ships weights only: config, tokenizer
HPSV2_REPO, DFN_REPO = "xswu/HPSv2", "apple/DFN5B-CLIP-ViT-H-14-384"    # open_clip checkpoints, tokenised ...
CLIP_H_REPO = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # ... by the CLIP BPE of this repo, PickScore's processor
PICKSCORE_REPO, CLIP_REPO = "yuvalkirstain/PickScore_v1", "openai/clip-vit-large-patch14"
AESTHETIC_REPO = "trl-lib/ddpo-aesthetic-predictor"
IMAGEREWARD_REPO, BERT_REPO = "THUDM/ImageReward", "google-bert/bert-base-uncased"
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
# open_clip keeps head counts out of its state dict: ViT-H-14 has 16 vision heads of width 80 and 16 text heads. HPSv2
# scores with `light_augmentation`: long side to 224, zero-padded to a square.
VIT_H_14 = {"model_cfg": {"vision_cfg": {"head_width": 80}, "text_cfg": {"heads": 16}},
            "preprocess_cfg": {"resize_mode": "longest"}}
IMAGEREWARD_MEAN, IMAGEREWARD_STD = 0.16717362830052426, 1.0333394966054072  # ImageReward.py's, not in the file
HPSV3_PIXELS = 256 * 28 * 28  # HPSv3 sets min_pixels = max_pixels: ~448 x 448 images, 256 visual tokens
# HPSv3's user turn verbatim, trailing spaces included (hpsv3/dataset/data_collator_qwen.py): its training text.
HPSV3_INSTRUCTION = (
    "\nYou are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a "
    "overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst "
    "and 10 being the best. \n\n**Visual Quality:**  \nEvaluate the overall visual quality of the image. The "
    "following sub-dimensions should be considered:\n- **Reasonableness:** The image should not contain any "
    "significant biological or logical errors, such as abnormal body structures or nonsensical environmental "
    "setups.\n- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy "
    "to interpret, with no blurring or indistinct areas.\n- **Detail Richness:** Consider the level of detail in "
    "textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).\n- **Aesthetic and "
    "Creativity:** Assess the artistic aspects of the image, including the color scheme, composition, atmosphere, "
    "depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.\n- "
    "**Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or adult "
    "material. If such content is present, the image quality and satisfaction score should be the lowest possible. \n"
    "\n**Text Alignment:**  \nAssess how well the image matches the textual prompt across the following "
    "sub-dimensions:\n- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, "
    "animal, object) align with the textual description. The subject should match the description in terms of "
    "number, appearance, and behavior.\n- **Style Relevance:** If the prompt specifies a particular artistic or "
    "stylistic style, evaluate how well the image adheres to this style.\n- **Contextual Consistency**: Assess "
    "whether the background, setting, and surrounding elements in the image logically fit the scenario described in "
    "the prompt. The environment should support and enhance the subject without contradictions.\n- **Attribute "
    "Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, accessories, "
    "expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, but critical "
    "attributes should be preserved.\n- **Semantic Coherence**: Evaluate whether the overall meaning and intent of "
    "the prompt are captured in the image. The generated content should not introduce elements that conflict with or "
    "distort the original description.\nTextual prompt - {text_prompt}\n\n\n"
    "\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n")
# Qwen2-VL's chat template rendered for one user turn (image, then text) plus the generation prompt, written out so
# the prompt is visible here and does not depend on the template a tokenizer ships with.
HPSV3_CHAT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>{image}"
              "<|vision_end|>{text}<|im_end|>\n<|im_start|>assistant\n")


# ----------------------------------------------------------------------------- finding weights, offline first
def _online() -> bool:
    """False when the hub cannot answer: HF_HUB_OFFLINE, or its host does not resolve (huggingface_hub would spend
    ~25 s retrying a dead network, then fail the same way). Behind a proxy the host need not resolve: try."""
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        return any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy")) or bool(
            socket.getaddrinfo(urlparse(constants.ENDPOINT).hostname, 443))
    except OSError:
        return False


def _load(reward: str, src: str, what: str, load: Callable[[bool], object]):
    """`load(local_files_only)` from a folder, else the HF cache, else the hub if it answers; else one line."""
    import transformers
    transformers.utils.logging.disable_progress_bar()  # loading bars would bury the training bars
    try:
        return load(True)
    except (OSError, ValueError) as e:
        err = e
    local = os.path.isdir(src) or src.startswith(("/", ".", "~"))
    online = not local and _online()
    if online:
        try:
            return load(False)
        except (OSError, ValueError) as e:
            err = e
    reason = f" ({(str(err).strip().splitlines() or [type(err).__name__])[0][:120]})" if local or online else ""
    where = (f"folder {src}" if local else f"{src} on the Hugging Face hub" if online else
             f"the Hugging Face cache for {src} (offline: HF_HUB_OFFLINE is set or the hub is unreachable)")
    get = "" if local else f"download it (`hf download {src}`) or "
    raise UsageError(f"reward {reward!r}: cannot load {what} from {where}{reason}; {get}point {PATH_FLAG} "
                     f"{reward}=DIR at a local copy") from None


def _fetch(reward: str, src: str, name: str) -> str:
    """The local path of file `name` of a folder or hub repo `src`."""
    def load(local_files_only):
        if not os.path.isdir(src):
            from huggingface_hub import hf_hub_download
            return hf_hub_download(src, name, local_files_only=local_files_only)
        if not os.path.isfile(os.path.join(src, name)):
            raise FileNotFoundError(f"no {name} there")
        return os.path.join(src, name)
    return _load(reward, src, name, load)


def _pretrained(reward: str, cls, src: str, what: str, **kwargs):
    return _load(reward, src, what, lambda lfo: cls.from_pretrained(src, local_files_only=lfo, **kwargs))


def _pick(src: str, base: str, marker: str) -> str:
    """`src` if it is a folder holding `marker` (a config or tokenizer), else the base repo its weights extend."""
    return src if os.path.isfile(os.path.join(src, marker)) else base


def _from_state_dict(reward: str, cls, config, state_dict: dict, dtype, **kwargs):
    """A transformers model built from `config` holding exactly `state_dict` (no random init on the way)."""
    model = cls.from_pretrained(None, config=config, state_dict=state_dict, dtype=dtype, **kwargs)
    if missing := sorted(set(model.state_dict()) - set(state_dict)):  # from_pretrained leaves them random, quietly
        raise UsageError(f"reward {reward!r}: the checkpoint lacks {len(missing)} weights, e.g. {missing[0]}")
    return model.eval()


# ----------------------------------------------------------------------------- preprocessing, in torch
def _resize(x: torch.Tensor, h: int, w: int, interpolation="bicubic", pil=True) -> torch.Tensor:
    """Antialiased resize of (N, C, H, W) floats; antialiased bicubic is PIL's filter (a = -0.5, widened support).

    pil=True also follows PIL's order: width, then height, clipped to [0, 1] (uint8) between and after. Bicubic
    overshoots at sharp edges, where one unclipped 2-D pass can differ from PIL by 18/255. pil=False is torchvision's
    resize of a float tensor (HPSv2's path): one pass, no clipping, antialiased (the default since torchvision 0.17).
    """
    sizes = [(x.shape[-2], w), (h, w)] if pil else [(h, w)]
    for size in sizes:
        if x.shape[-2:] != size:
            x = F.interpolate(x, size, mode=interpolation, antialias=True, align_corners=False)
            x = x.clamp(0, 1) if pil else x
    return x


def _normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    return (x - x.new_tensor(mean).view(1, -1, 1, 1)) / x.new_tensor(std).view(1, -1, 1, 1)


def preprocess(images, size: int, mean=OPENAI_MEAN, std=OPENAI_STD, *, mode="shortest", interpolation="bicubic"):
    """(N, 3, H, W) in [0, 1] -> normalised (N, 3, size, size) float32: a processor's PIL path, in torch.

    "shortest": short side -> size, long side int(size * long / short), centre crop (CLIPImageProcessor; torchvision
    Resize(int) + CenterCrop); "longest": long side -> size, short side rounded, zero-padded to a square before
    normalising (HPSv2's ResizeMaxSize on a tensor); "squash": straight to size x size.
    Gap to the PIL path (uint8 in, rounded to 1/255 between and after its two passes): at most ~1.5/255 and ~0.3/255
    on average in [0, 1] units, for 32..1280 px inputs to 224 px (tests/test_rewards.py bounds it).
    An odd crop margin starts at floor(margin / 2) as in transformers; torchvision rounds it, one pixel further.
    """
    x = images.float()
    h, w = x.shape[-2:]
    if mode not in ("shortest", "longest", "squash"):
        raise UsageError(f"unknown resize mode {mode!r}; choose shortest, longest or squash")
    oh, ow = {"shortest": (size, int(size * w / h)) if h <= w else (int(size * h / w), size), "squash": (size, size),
              "longest": (round(h * size / max(h, w)), round(w * size / max(h, w)))}[mode]
    x = _resize(x, oh, ow, interpolation, pil=mode != "longest")
    if mode == "longest":  # black (0) borders, before normalising, as HPSv2 pads
        x = F.pad(x, ((size - ow) // 2, size - ow - (size - ow) // 2, (size - oh) // 2, size - oh - (size - oh) // 2))
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    return _normalize(x[..., top:top + size, left:left + size], mean, std)  # (N, 3, size, size)


def smart_resize(h: int, w: int, factor=28, min_pixels=HPSV3_PIXELS, max_pixels=HPSV3_PIXELS) -> tuple[int, int]:
    """Qwen2-VL's size rule: sides multiples of `factor`, area within [min_pixels, max_pixels], aspect ratio kept."""
    hb, wb = max(factor, round(h / factor) * factor), max(factor, round(w / factor) * factor)
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        hb, wb = math.floor(h / beta / factor) * factor, math.floor(w / beta / factor) * factor
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        hb, wb = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return hb, wb


def qwen2vl_pixels(images, patch=14, merge=2, temporal=2, min_pixels=HPSV3_PIXELS, max_pixels=HPSV3_PIXELS):
    """(N, 3, H, W) in [0, 1] -> Qwen2-VL `pixel_values` (N gh gw, 3 temporal patch^2) and `image_grid_thw` (N, 3).

    HPSv3 resizes with PIL bicubic to `smart_resize` (min = max pixels); the image processor then normalises and
    cuts patches: rows run over merge x merge blocks of patches, a row is (C, T, patch, patch) with the still image
    repeated over the T = 2 frames of a temporal patch.
    """
    n, c, h, w = images.shape
    oh, ow = smart_resize(h, w, patch * merge, min_pixels, max_pixels)
    x = _normalize(_resize(images.float(), oh, ow), OPENAI_MEAN, OPENAI_STD)  # (N, 3, oh, ow)
    gh, gw = oh // patch, ow // patch
    x = x.reshape(n, c, gh // merge, merge, patch, gw // merge, merge, patch).permute(0, 2, 5, 3, 6, 1, 4, 7)
    x = x.unsqueeze(6).expand(*x.shape[:6], temporal, patch, patch)  # (N, gh/m, gw/m, m, m, C, T, p, p)
    grid = torch.tensor([[1, gh, gw]] * n, device=images.device)
    return x.reshape(n * gh * gw, c * temporal * patch * patch), grid


# ----------------------------------------------------------------------------- checkpoint layouts
def open_clip_to_hf(state_dict: dict) -> dict:
    """An open_clip CLIP state dict (ViT towers) -> transformers CLIPModel names. Every key is mapped or refused."""
    top = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
           "positional_embedding": "text_model.embeddings.position_embedding.weight", "logit_scale": "logit_scale",
           "visual.class_embedding": "vision_model.embeddings.class_embedding",
           "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
           "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight"}
    for ours, theirs in (("ln_final", "text_model.final_layer_norm"), ("visual.ln_pre", "vision_model.pre_layrnorm"),
                         ("visual.ln_post", "vision_model.post_layernorm")):
        top |= {f"{ours}.weight": f"{theirs}.weight", f"{ours}.bias": f"{theirs}.bias"}
    # open_clip applies its projections as x @ P with P (width, embed); nn.Linear stores the transpose.
    projections = {"text_projection": "text_projection.weight", "visual.proj": "visual_projection.weight"}
    block = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
             "attn.out_proj": "self_attn.out_proj"}
    out = {}
    for key, value in state_dict.items():
        m = re.fullmatch(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+?)[._](weight|bias)", key)
        layer = m and f"{'vision' if m[1] else 'text'}_model.encoder.layers.{m[2]}"
        if key in top:
            out[top[key]] = value
        elif key in projections:
            out[projections[key]] = value.t().contiguous()
        elif m and m[3] == "attn.in_proj":  # nn.MultiheadAttention packs q, k, v in one (3 width, width) matrix
            out |= {f"{layer}.self_attn.{n}_proj.{m[4]}": part for n, part in zip("qkv", value.chunk(3))}
        elif m and m[3] in block:
            out[f"{layer}.{block[m[3]]}.{m[4]}"] = value
        elif key != "attn_mask":  # a buffer some open_clip versions saved
            raise UsageError(f"{key!r} is not part of an open_clip ViT CLIP checkpoint")
    return out


def _open_clip_config(sd: dict, model_cfg: dict, tokenizer):
    """The CLIPConfig of an open_clip state dict: sizes from the tensors, heads and activation from `model_cfg`."""
    from transformers import CLIPConfig
    act = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"  # DFN5B was trained with QuickGELU, ViT-H-14 not

    def tower(prefix, heads):
        width, mlp = (sd[f"{prefix}transformer.resblocks.0.{n}.weight"].shape[0] for n in ("ln_1", "mlp.c_fc"))
        layers = sum(k.startswith(f"{prefix}transformer.resblocks.") and k.endswith(".ln_1.weight") for k in sd)
        return dict(hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers, hidden_act=act,
                    num_attention_heads=heads(width))
    patch = sd["visual.conv1.weight"].shape[-1]
    vision = tower("visual.", lambda w: w // model_cfg.get("vision_cfg", {}).get("head_width", 64))
    vision |= dict(patch_size=patch, image_size=math.isqrt(sd["visual.positional_embedding"].shape[0] - 1) * patch)
    text = tower("", lambda w: model_cfg.get("text_cfg", {}).get("heads", w // 64))
    # open_clip pools text at argmax(token id), the first end-of-text token: eos pooling in transformers.
    text |= dict(vocab_size=sd["token_embedding.weight"].shape[0], bos_token_id=tokenizer.bos_token_id,
                 max_position_embeddings=sd["positional_embedding"].shape[0], eos_token_id=tokenizer.eos_token_id,
                 pad_token_id=tokenizer.pad_token_id)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=sd["text_projection"].shape[1])


def _mlp(sd: dict, prefix: str, act=None) -> torch.nn.Sequential:
    """The Linear layers saved as `prefix`<index>, in index order, with `act` between them: a reward head, in fp32."""
    idx = sorted({int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)})
    layers = []
    for i in idx:
        w, b = sd[f"{prefix}{i}.weight"], sd.get(f"{prefix}{i}.bias")
        layers.append(torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None))
        layers[-1].load_state_dict({"weight": w} | ({"bias": b} if b is not None else {}))
        layers += [act()] if act and i != idx[-1] else []
    return torch.nn.Sequential(*layers).float().eval()


# ----------------------------------------------------------------------------- CLIP-family rewards
def _cosine_reward(model, tokenizer, pre, scale: float = 1.0) -> RewardFn:
    """scale * cosine(image, text) of a transformers CLIPModel."""
    @torch.no_grad()
    def score(images, prompts):
        t = tokenizer(prompts, padding=True, truncation=True, return_tensors="pt",
                      max_length=model.config.text_config.max_position_embeddings).to(model.device)
        img = model.vision_model(pixel_values=pre(images.to(model.device)).to(model.dtype)).pooler_output
        txt = model.text_model(input_ids=t.input_ids, attention_mask=t.attention_mask).pooler_output
        img, txt = (F.normalize(p(e).float(), dim=-1) for p, e in ((model.visual_projection, img),
                                                                     (model.text_projection, txt)))
        return (scale * (img * txt).sum(-1)).to(images.device)  # (N,)
    return score


def _hf_clip(reward, src, tokenizer_base, device, dtype):
    from transformers import AutoTokenizer, CLIPModel
    model = _pretrained(reward, CLIPModel, src, "the CLIP model", dtype=dtype).to(device).eval()
    tok = _pretrained(reward, AutoTokenizer, _pick(src, tokenizer_base, "tokenizer_config.json"), "the tokenizer")
    # The CLIPImageProcessor of these repos: short side 224 (bicubic), centre crop 224, OpenAI mean and std.
    return model, tok, partial(preprocess, size=model.config.vision_config.image_size)


def _open_clip(reward, src, filename, default_cfg, device, dtype):
    """An open_clip checkpoint in a transformers CLIPModel (`open_clip_to_hf`), tokenised by the CLIP BPE."""
    from transformers import AutoTokenizer, CLIPModel
    sd = torch.load(_fetch(reward, src, filename), map_location="cpu", weights_only=True)
    sd = sd.get("state_dict", sd)  # HPSv2 saves a training checkpoint around it
    cfg = default_cfg
    if cfg is None or os.path.isfile(os.path.join(src, "open_clip_config.json")):
        with open(_fetch(reward, src, "open_clip_config.json")) as f:
            cfg = json.load(f)
    tok = _pretrained(reward, AutoTokenizer, _pick(src, CLIP_H_REPO, "tokenizer_config.json"), "the tokenizer")
    config = _open_clip_config(sd, cfg["model_cfg"], tok)
    model = _from_state_dict(reward, CLIPModel, config, open_clip_to_hf(sd), dtype).to(device)
    p = cfg.get("preprocess_cfg", {})
    return model, tok, partial(preprocess, size=config.vision_config.image_size, mean=p.get("mean", OPENAI_MEAN),
                               std=p.get("std", OPENAI_STD), mode=p.get("resize_mode", "shortest"),
                               interpolation=p.get("interpolation", "bicubic"))


def pickscore(path=None, *, device="cpu", dtype=torch.float32) -> RewardFn:
    """PickScore v1 (CLIP-H tuned on Pick-a-Pic) as its paper reports it: logit_scale.exp() * cosine (~100 cos)."""
    model, tok, pre = _hf_clip("pickscore", path or PICKSCORE_REPO, CLIP_H_REPO, device, dtype)
    return _cosine_reward(model, tok, pre, scale=model.logit_scale.exp().item())


def clip(path=None, *, device="cpu", dtype=torch.float32) -> RewardFn:
    """CLIP score: cosine(image, text) of openai CLIP ViT-L/14."""
    return _cosine_reward(*_hf_clip("clip", path or CLIP_REPO, CLIP_REPO, device, dtype))


def clip_dfn(path=None, *, device="cpu", dtype=torch.float32) -> RewardFn:
    """CLIP score as GCPO computes it: cosine(image, text) of Apple's DFN5B CLIP ViT-H-14 (378 px, QuickGELU)."""
    return _cosine_reward(*_open_clip("clip_dfn", path or DFN_REPO, "open_clip_pytorch_model.bin", None, device, dtype))


def hpsv2(path=None, *, device="cpu", dtype=torch.float32) -> RewardFn:
    """HPSv2.1: cosine(image, text) of an open_clip ViT-H-14 tuned on HPD v2, without the logit scale (~0.3)."""
    return _cosine_reward(*_open_clip("hpsv2", path or HPSV2_REPO, "HPS_v2.1_compressed.pt", VIT_H_14, device, dtype))


def aesthetic(path=None, *, device="cpu", dtype=torch.float32) -> RewardFn:
    """LAION aesthetic predictor v2 (DDPO's reward): a linear MLP on the unit CLIP ViT-L/14 image embedding."""
    src = path or AESTHETIC_REPO
    head = _mlp(torch.load(_fetch("aesthetic", src, "aesthetic-model.pth"), weights_only=True), "layers.").to(device)
    model, _, pre = _hf_clip("aesthetic", _pick(src, CLIP_REPO, "config.json"), CLIP_REPO, device, dtype)

    @torch.no_grad()
    def score(images, prompts):  # 768 -> 1024 -> 128 -> 64 -> 16 -> 1 with no activations, as it was trained
        img = model.vision_model(pixel_values=pre(images.to(device)).to(dtype)).pooler_output
        return head(F.normalize(model.visual_projection(img).float(), dim=-1)).squeeze(1).to(images.device)
    return score


# ----------------------------------------------------------------------------- BLIP and Qwen2-VL rewards
def imagereward(path=None, *, device="cpu", dtype=torch.float32) -> RewardFn:
    """ImageReward v1.0: BLIP's ViT-L/16 reads the image, its BERT reads the prompt cross-attending to the image, and
    an MLP on the [CLS] state gives the reward, standardised by the published mean and std."""
    from transformers import AutoTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel
    src = path or IMAGEREWARD_REPO
    sd = torch.load(_fetch("imagereward", src, "ImageReward.pt"), weights_only=True)
    with open(_fetch("imagereward", src, "med_config.json")) as f:
        med = json.load(f)  # the text encoder's BERT-base sizes
    # BLIP's med.py BERT is what BlipTextModel ports, names included; its timm-style ViT differs only in names.
    text_sd = {k[18:]: v for k, v in sd.items() if k.startswith("blip.text_encoder.") and "position_ids" not in k}
    renames = [("blocks.", "encoder.layers."), ("norm1", "layer_norm1"), ("norm2", "layer_norm2"),
               ("attn.qkv", "self_attn.qkv"), ("attn.proj", "self_attn.projection"), ("norm.", "post_layernorm."),
               ("cls_token", "embeddings.class_embedding"), ("pos_embed", "embeddings.position_embedding"),
               ("patch_embed.proj", "embeddings.patch_embedding")]  # a key they miss fails _from_state_dict
    vision_sd = {}
    for k, v in sd.items():
        if k.startswith("blip.visual_encoder."):
            for old, new in renames:
                k = k.replace(old, new)
            vision_sd[k[len("blip.visual_encoder."):]] = v
    width, patch = vision_sd["embeddings.patch_embedding.weight"].shape[::3]  # (width, 3, patch, patch)
    vcfg = BlipVisionConfig(hidden_size=width, intermediate_size=vision_sd["encoder.layers.0.mlp.fc1.weight"].shape[0],
                            num_hidden_layers=sum(k.endswith("layer_norm1.weight") for k in vision_sd),
                            num_attention_heads=width // 64, layer_norm_eps=1e-6, patch_size=patch,  # BLIP's ViT
                            image_size=math.isqrt(vision_sd["embeddings.position_embedding"].shape[1] - 1) * patch)
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "max_position_embeddings", "layer_norm_eps", "hidden_act")
    # is_decoder=True builds the cross-attention layers; the call below still attends bidirectionally (is_decoder=False)
    tcfg = BlipTextConfig(**{k: med[k] for k in keys}, encoder_hidden_size=width, is_decoder=True,
                          pad_token_id=med.get("pad_token_id", 0))
    vision = _from_state_dict("imagereward", BlipVisionModel, vcfg, vision_sd, dtype).to(device)
    text = _from_state_dict("imagereward", BlipTextModel, tcfg, text_sd, dtype, add_pooling_layer=False).to(device)
    head = _mlp(sd, "mlp.layers.").to(device)  # 768 -> 1024 -> 128 -> 64 -> 16 -> 1, no activations, as trained
    tok = _pretrained("imagereward", AutoTokenizer, _pick(src, BERT_REPO, "tokenizer_config.json"), "the tokenizer")
    pre = partial(preprocess, size=vcfg.image_size)  # torchvision Resize(224, bicubic) + CenterCrop, OpenAI mean/std

    @torch.no_grad()
    def score(images, prompts):
        image_states = vision(pixel_values=pre(images.to(device)).to(dtype)).last_hidden_state  # (N, 1 + P, D)
        # ImageReward pads every prompt to 35 tokens and cuts longer ones there.
        t = tok(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt").to(device)
        states = text(input_ids=t.input_ids, attention_mask=t.attention_mask, encoder_hidden_states=image_states,
                      is_decoder=False).last_hidden_state  # (N, 35, D)
        return ((head(states[:, 0].float()).squeeze(1) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD).to(images.device)
    return score


def _qwen2vl_key(key: str) -> str:
    """HPSv3.safetensors was saved by transformers 4.45 (model.* = the language model, visual.*); 5.x nests both."""
    for old, new in (("model.language_model.", "language_model."), ("model.visual.", "visual."),
                     ("model.", "language_model."), ("visual.", "visual.")):
        if key.startswith(old):
            return new + key[len(old):]
    raise UsageError(f"{key!r} is not part of a Qwen2-VL reward checkpoint")


def hpsv3(path=None, *, device="cpu", dtype=torch.float32) -> RewardFn:
    """HPSv3: Qwen2-VL-7B reads the image and HPSv3's instruction; a head on the hidden state of the added <|Reward|>
    token predicts the (mu, sigma) of a Gaussian preference score. The reward is mu."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer, Qwen2VLModel
    src = path or HPSV3_REPO
    sd = load_file(_fetch("hpsv3", src, "HPSv3.safetensors"), device=str(device))  # straight to the device: 16 GB
    config = _pretrained("hpsv3", AutoConfig, _pick(src, QWEN2VL_REPO, "config.json"), "the Qwen2-VL config")
    tok = _pretrained("hpsv3", AutoTokenizer, _pick(src, QWEN2VL_REPO, "tokenizer_config.json"), "the tokenizer")
    tok.add_tokens(["<|Reward|>"], special_tokens=True)  # as HPSv3, which then shrank the embeddings to fit
    tok.padding_side = "right"  # as HPSv3; under causal attention <|Reward|> cannot see the padding after it
    reward_id = tok.convert_tokens_to_ids("<|Reward|>")
    # lm_head is dropped: the reward reads hidden states, never logits (1 GB saved in bf16).
    backbone = {_qwen2vl_key(k): v for k, v in sd.items() if not k.startswith(("rm_head.", "lm_head."))}
    config.text_config.vocab_size = backbone["language_model.embed_tokens.weight"].shape[0]
    model = _from_state_dict("hpsv3", Qwen2VLModel, config, backbone, dtype).to(device)
    # Linear-ReLU-Linear-ReLU-Linear -> (mu, sigma), in fp32 as HPSv3 keeps it (its dropout is off at inference)
    head = _mlp({k[8:]: v for k, v in sd.items() if k.startswith("rm_head.")}, "", torch.nn.ReLU).to(device)
    vc = config.vision_config

    @torch.no_grad()
    def score(images, prompts):
        pixels, grid = qwen2vl_pixels(images.to(device), vc.patch_size, vc.spatial_merge_size, vc.temporal_patch_size)
        pads = "<|image_pad|>" * (int(grid[0].prod()) // vc.spatial_merge_size**2)  # 256 for 448 x 448
        texts = [HPSV3_CHAT.format(image=pads, text=HPSV3_INSTRUCTION.format(text_prompt=p)) for p in prompts]
        t = tok(texts, padding=True, return_tensors="pt").to(device)  # (N, L), right-padded
        hidden = model(input_ids=t.input_ids, attention_mask=t.attention_mask, pixel_values=pixels.to(dtype),
                       image_grid_thw=grid, mm_token_type_ids=(t.input_ids == config.image_token_id).int(),
                       use_cache=False).last_hidden_state  # (N, L, D)
        at = (t.input_ids == reward_id).int().argmax(1)  # (N,) position of <|Reward|>
        return head(hidden[torch.arange(len(prompts), device=device), at].float())[:, 0].to(images.device)  # mu
    return score


# ----------------------------------------------------------------------------- weight-free rewards
def jpeg(path=None, *, device="cpu", dtype=torch.float32, sign=-1.0) -> RewardFn:
    """DDPO's sign * (size in kB of the image as a quality-95 JPEG), encoded in memory; -1 is compressibility."""
    from PIL import Image

    def score(images, prompts):
        pixels = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        sizes = []
        for a in pixels:  # JPEG has no batched encoder: the one per-image loop here (~4 ms at 512 px)
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="JPEG", quality=95)
            sizes.append(sign * buf.tell() / 1000)
        return torch.tensor(sizes, device=images.device)  # (N,)
    return score


def toy_verifier(path=None, *, device="cpu", dtype=torch.float32) -> RewardFn:
    """The toy world's exact verifier: the fraction of the prompt's atoms (object, colour, count, position) right."""
    import toy
    return lambda images, prompts: toy.verify(images.detach().float().cpu(), prompts).score.float().to(images.device)


# ----------------------------------------------------------------------------- registry and mix
REWARDS: dict[str, Callable[..., RewardFn]] = {
    "hpsv3": hpsv3, "hpsv2": hpsv2, "pickscore": pickscore, "clip": clip, "clip_dfn": clip_dfn, "aesthetic": aesthetic,
    "imagereward": imagereward, "jpeg_compressibility": partial(jpeg, sign=-1.0),
    "jpeg_incompressibility": partial(jpeg, sign=1.0), "toy": toy_verifier}


def parse_reward_specs(specs: list[str]) -> list[tuple[str, float]]:
    """["hpsv3", "clip:0.5"] -> [("hpsv3", 1.0), ("clip", 0.5)]: NAME or NAME:WEIGHT, each name once."""
    out = []
    for spec in specs:
        name, _, weight = spec.partition(":")
        if name not in REWARDS:
            raise UsageError(f"unknown reward {name!r} in --reward {spec}; choose from {', '.join(REWARDS)}")
        try:
            out.append((name, float(weight) if weight else 1.0))
        except ValueError:
            raise UsageError(f"--reward {spec}: the weight after ':' must be a number, e.g. {name}:0.5") from None
    if not out or len({n for n, _ in out}) != len(out):
        raise UsageError(f"--reward {' '.join(specs) or '(none)'}: give each reward once, as NAME or NAME:WEIGHT, "
                         f"NAME one of {', '.join(REWARDS)}")
    return out


def build_reward(specs: list[str], *, device="cpu", dtype=torch.float32, paths=None):
    """The weighted mix: fn(images, prompts) -> (total (N,), {name: raw score (N,)}), total = sum of weight * raw.

    `paths`: {name: hub id or folder}, or the CLI's ["name=DIR", ...]; other rewards load their default checkpoint.
    Raw scores are summed as Flow-GRPO does (MixGRPO's per-reward advantages would need the group ids here).
    """
    parsed = parse_reward_specs(specs)
    if isinstance(paths, (list, tuple)):
        if not all("=" in p for p in paths):
            raise UsageError(f"{PATH_FLAG} takes NAME=DIR, e.g. {PATH_FLAG} hpsv3=/models/HPSv3; got {' '.join(paths)}")
        paths = dict(p.split("=", 1) for p in paths)
    if unknown := sorted(set(paths or {}) - {n for n, _ in parsed}):
        raise UsageError(f"{PATH_FLAG} names {', '.join(unknown)}, which is not among --reward {' '.join(specs)}")
    fns = {name: REWARDS[name]((paths or {}).get(name), device=device, dtype=dtype) for name, _ in parsed}

    @torch.no_grad()
    def mix(images, prompts):
        parts = {name: fns[name](images, prompts).float() for name, _ in parsed}  # name -> (N,)
        return sum(w * parts[name] for name, w in parsed), parts
    return mix
