"""
How rewards.py reads the published reward models, without their packages (hpsv2, image-reward, hpsv3):

- weights are found offline first: a folder, else the local Hugging Face cache, else the hub if it answers,
  else one line naming the file, where it was looked for and the flag to change (`fetch`, `pretrained`);
- checkpoint keys are mapped into transformers modules: open_clip's CLIP into CLIPModel, BLIP's timm ViT and
  med.py BERT into BlipVisionModel and BlipTextModel, HPSv3's transformers 4.45 Qwen2-VL into Qwen2VLModel,
  the MLP heads into nn.Sequential; a key that is not mapped is refused, a missing weight is an error;
- images are preprocessed in torch as each model's processor does it on PIL images (`preprocess`,
  `qwen2vl_pixels`), so a batch is scored on its device with no PIL or disk round trip.

Nothing here knows a reward's name or default checkpoint: rewards.py holds those.
"""

import math
import os
import re
import socket
from collections.abc import Callable
from urllib.parse import urlparse

import torch
import torch.nn.functional as F

from runtime import UsageError

PATH_FLAG = "--reward-path"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's pixel normalisation, kept by every model here
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
HPSV3_PIXELS = 256 * 28 * 28  # HPSv3 sets min_pixels = max_pixels: ~448 x 448 images, 256 visual tokens
# open_clip keeps head counts out of its state dict: ViT-H-14 has 16 vision heads of width 80, 16 text heads.
# HPSv2 scores with `light_augmentation`: long side to 224, zero-padded to a square.
VIT_H_14 = {
    "model_cfg": {"vision_cfg": {"head_width": 80}, "text_cfg": {"heads": 16}},
    "preprocess_cfg": {"resize_mode": "longest"},
}
# BLIP's timm-style ViT (ImageReward's image tower) -> BlipVisionModel names, applied in order to every key.
BLIP_VIT_RENAMES = {
    "blocks.": "encoder.layers.",
    "norm1": "layer_norm1",
    "norm2": "layer_norm2",
    "attn.qkv": "self_attn.qkv",
    "attn.proj": "self_attn.projection",
    "norm.": "post_layernorm.",
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj": "embeddings.patch_embedding",
}


# ----------------------------------------------------------------------------- finding weights, offline first
def _online() -> bool:
    """False when the hub cannot answer: HF_HUB_OFFLINE, or its host does not resolve (huggingface_hub would
    spend ~25 s retrying a dead network, then fail the same way). Behind a proxy it need not resolve: try."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy")):
        return True
    try:
        return bool(socket.getaddrinfo(urlparse(constants.ENDPOINT).hostname, 443))
    except OSError:
        return False


def _load(reward: str, src: str, what: str, load: Callable[[bool], object]):
    """`load(local_files_only)` from a folder, else the HF cache, else the hub if it answers, else one line"""
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
    if local:
        where = f"folder {src}"
    elif online:
        where = f"{src} on the Hugging Face hub"
    else:
        where = f"the Hugging Face cache for {src} (offline: HF_HUB_OFFLINE is set or the hub is unreachable)"
    if local or online:  # the first line of the loader's own complaint
        where += f" ({(str(err).strip().splitlines() or [type(err).__name__])[0][:120]})"
    get = "" if local else f"download it (`hf download {src}`) or "
    fix = f"{get}point {PATH_FLAG} {reward}=DIR at a local copy"
    raise UsageError(f"reward {reward!r}: cannot load {what} from {where}; {fix}") from None


def fetch(reward: str, src: str, name: str) -> str:
    """The local path of file `name` of a folder or hub repo `src`."""

    def load(local_files_only):
        if not os.path.isdir(src):
            from huggingface_hub import hf_hub_download

            return hf_hub_download(src, name, local_files_only=local_files_only)
        if not os.path.isfile(os.path.join(src, name)):
            raise FileNotFoundError(f"no {name} there")
        return os.path.join(src, name)

    return _load(reward, src, name, load)


def pretrained(reward: str, cls, src: str, what: str, **kwargs):
    """`cls.from_pretrained(src)`, found as `fetch` finds a file; `what` names it in the error."""
    return _load(reward, src, what, lambda lfo: cls.from_pretrained(src, local_files_only=lfo, **kwargs))


def pick(src: str, base: str, marker: str) -> str:
    """`src` if it is a folder holding `marker` (a config or tokenizer), else the base repo it extends."""
    return src if os.path.isfile(os.path.join(src, marker)) else base


def load_tokenizer(reward: str, src: str, base: str):
    """The tokenizer of folder `src`, else that of the base repo its weights extend."""
    from transformers import AutoTokenizer

    return pretrained(reward, AutoTokenizer, pick(src, base, "tokenizer_config.json"), "the tokenizer")


def from_state_dict(reward: str, cls, config, state_dict: dict, dtype, **kwargs):
    """A transformers model built from `config` holding exactly `state_dict` (no random init on the way)."""
    model = cls.from_pretrained(None, config=config, state_dict=state_dict, dtype=dtype, **kwargs)
    missing = sorted(set(model.state_dict()) - set(state_dict))  # from_pretrained leaves them random, quietly
    if missing:
        raise UsageError(f"reward {reward!r}: the checkpoint lacks {len(missing)} weights, e.g. {missing[0]}")
    return model.eval()


# ----------------------------------------------------------------------------- preprocessing, in torch
def _resize(x: torch.Tensor, h: int, w: int, interpolation="bicubic", pil=True) -> torch.Tensor:
    """Antialiased resize of (N, C, H, W) floats; antialiased bicubic is PIL's filter (a = -0.5, wide support)

    pil=True also follows PIL's order: width, then height, clipped to [0, 1] (uint8) between and after.
    Bicubic overshoots at sharp edges, where one unclipped 2-D pass can differ from PIL by 18/255. pil=False
    is torchvision's resize of a float tensor (HPSv2's path): one pass, no clipping, antialiased (the default
    since torchvision 0.17).
    """
    sizes = [(x.shape[-2], w), (h, w)] if pil else [(h, w)]
    for size in sizes:
        if x.shape[-2:] != size:
            x = F.interpolate(x, size, mode=interpolation, antialias=True, align_corners=False)
            x = x.clamp(0, 1) if pil else x
    return x


def _normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    return (x - x.new_tensor(mean).view(1, -1, 1, 1)) / x.new_tensor(std).view(1, -1, 1, 1)


def preprocess(images, size, mean=OPENAI_MEAN, std=OPENAI_STD, *, mode="shortest", interpolation="bicubic"):
    """(N, 3, H, W) in [0, 1] -> normalised (N, 3, size, size) float32: a processor's PIL path, in torch.

    "shortest": short side -> size, long side int(size * long / short), centre crop (CLIPImageProcessor;
    torchvision Resize(int) + CenterCrop); "longest": long side -> size, short side rounded, zero-padded to a
    square before normalising (HPSv2's ResizeMaxSize on a tensor); "squash": straight to size x size.
    Gap to the PIL path (uint8 in, rounded to 1/255 between and after its two passes): at most ~1.5/255 and
    ~0.3/255 on average in [0, 1] units, for 32..1280 px inputs to 224 px (tests/test_reward_models.py).
    An odd crop margin starts at floor(margin / 2) as in transformers; torchvision rounds it, a pixel further.
    """
    x = images.float()
    h, w = x.shape[-2:]
    if mode == "shortest":
        oh, ow = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    elif mode == "longest":
        oh, ow = round(h * size / max(h, w)), round(w * size / max(h, w))
    elif mode == "squash":
        oh, ow = size, size
    else:
        raise UsageError(f"unknown resize mode {mode!r}; choose shortest, longest or squash")
    x = _resize(x, oh, ow, interpolation, pil=mode != "longest")  # (N, 3, oh, ow)
    if mode == "longest":  # black (0) borders, before normalising, as HPSv2 pads
        top, left = (size - oh) // 2, (size - ow) // 2
        x = F.pad(x, (left, size - ow - left, top, size - oh - top))  # (N, 3, size, size)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[..., top : top + size, left : left + size]  # (N, 3, size, size)
    return _normalize(x, mean, std)


def smart_resize(h, w, factor=28, min_pixels=HPSV3_PIXELS, max_pixels=HPSV3_PIXELS) -> tuple[int, int]:
    """Qwen2-VL's size rule: sides multiples of `factor`, area in [min_pixels, max_pixels], aspect kept."""
    hb, wb = max(factor, round(h / factor) * factor), max(factor, round(w / factor) * factor)
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        hb, wb = math.floor(h / beta / factor) * factor, math.floor(w / beta / factor) * factor
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        hb, wb = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return hb, wb


def qwen2vl_pixels(images, patch=14, merge=2, temporal=2, min_pixels=HPSV3_PIXELS, max_pixels=HPSV3_PIXELS):
    """(N, 3, H, W) in [0, 1] -> Qwen2-VL `pixel_values` (N gh gw, 3 T p^2) and `image_grid_thw` (N, 3).

    HPSv3 resizes with PIL bicubic to `smart_resize` (min = max pixels); the image processor then normalises
    and cuts patches: rows run over merge x merge blocks of patches, a row is (C, T, patch, patch) with the
    still image repeated over the T = 2 frames of a temporal patch.
    """
    n, c, h, w = images.shape
    oh, ow = smart_resize(h, w, patch * merge, min_pixels, max_pixels)
    x = _normalize(_resize(images.float(), oh, ow), OPENAI_MEAN, OPENAI_STD)  # (N, 3, oh, ow)
    gh, gw = oh // patch, ow // patch
    x = x.reshape(n, c, gh // merge, merge, patch, gw // merge, merge, patch).permute(0, 2, 5, 3, 6, 1, 4, 7)
    x = x.unsqueeze(6).expand(*x.shape[:6], temporal, patch, patch)  # (N, gh/m, gw/m, m, m, C, T, p, p)
    grid = torch.tensor([[1, gh, gw]] * n, device=images.device)  # (N, 3): frames, rows, columns of patches
    return x.reshape(n * gh * gw, c * temporal * patch * patch), grid


# ----------------------------------------------------------------------------- checkpoint layouts
def open_clip_to_hf(state_dict: dict) -> dict:
    """An open_clip CLIP state dict (ViT towers) -> transformers CLIPModel names; other keys are refused."""
    top = {
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "logit_scale": "logit_scale",
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    }
    norms = {
        "ln_final": "text_model.final_layer_norm",
        "visual.ln_pre": "vision_model.pre_layrnorm",
        "visual.ln_post": "vision_model.post_layernorm",
    }
    for ours, theirs in norms.items():
        top |= {f"{ours}.weight": f"{theirs}.weight", f"{ours}.bias": f"{theirs}.bias"}
    # open_clip applies its projections as x @ P with P (width, embed); nn.Linear stores the transpose.
    projections = {"text_projection": "text_projection.weight", "visual.proj": "visual_projection.weight"}
    block = {
        "ln_1": "layer_norm1",
        "ln_2": "layer_norm2",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
        "attn.out_proj": "self_attn.out_proj",
    }
    out = {}
    for key, value in state_dict.items():
        m = re.fullmatch(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+?)[._](weight|bias)", key)
        layer = m and f"{'vision' if m[1] else 'text'}_model.encoder.layers.{m[2]}"
        if key in top:
            out[top[key]] = value
        elif key in projections:
            out[projections[key]] = value.t().contiguous()
        elif m and m[3] == "attn.in_proj":  # nn.MultiheadAttention packs q, k, v in one (3 width, width)
            for name, part in zip("qkv", value.chunk(3), strict=True):
                out[f"{layer}.self_attn.{name}_proj.{m[4]}"] = part
        elif m and m[3] in block:
            out[f"{layer}.{block[m[3]]}.{m[4]}"] = value
        elif key != "attn_mask":  # a buffer some open_clip versions saved
            raise UsageError(f"{key!r} is not part of an open_clip ViT CLIP checkpoint")
    return out


def open_clip_config(sd: dict, model_cfg: dict, tokenizer):
    """The CLIPConfig of an open_clip state dict: sizes from its tensors, heads and activation from its cfg"""
    from transformers import CLIPConfig

    act = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"  # DFN5B was trained with QuickGELU

    def tower(prefix):
        blocks = f"{prefix}transformer.resblocks."
        width, mlp = sd[f"{blocks}0.ln_1.weight"].shape[0], sd[f"{blocks}0.mlp.c_fc.weight"].shape[0]
        layers = sum(k.startswith(blocks) and k.endswith(".ln_1.weight") for k in sd)
        return dict(hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers, hidden_act=act)

    vision, text = tower("visual."), tower("")
    head_width = model_cfg.get("vision_cfg", {}).get("head_width", 64)
    vision["num_attention_heads"] = vision["hidden_size"] // head_width
    text["num_attention_heads"] = model_cfg.get("text_cfg", {}).get("heads", text["hidden_size"] // 64)
    patch = sd["visual.conv1.weight"].shape[-1]
    grid = math.isqrt(sd["visual.positional_embedding"].shape[0] - 1)  # (1 + grid^2, width)
    vision |= dict(patch_size=patch, image_size=grid * patch)
    text["vocab_size"] = sd["token_embedding.weight"].shape[0]
    text["max_position_embeddings"] = sd["positional_embedding"].shape[0]
    # open_clip pools text at argmax(token id), the first end-of-text token: eos pooling in transformers.
    text |= dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    text["pad_token_id"] = tokenizer.pad_token_id
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=sd["text_projection"].shape[1])


def imagereward_towers(sd: dict, med: dict, dtype):
    """ImageReward.pt's BLIP towers as (BlipVisionModel, BlipTextModel); `med` is its med_config.json. BLIP's
    med.py BERT is what BlipTextModel ports, names included; its timm-style ViT differs only in names."""
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    text_sd = {k[18:]: v for k, v in sd.items() if k.startswith("blip.text_encoder.")}
    text_sd = {k: v for k, v in text_sd.items() if "position_ids" not in k}  # a buffer, not a weight
    vision_sd = {}
    for k, v in sd.items():
        if k.startswith("blip.visual_encoder."):
            for old, new in BLIP_VIT_RENAMES.items():
                k = k.replace(old, new)
            vision_sd[k[len("blip.visual_encoder.") :]] = v
    width, patch = vision_sd["embeddings.patch_embedding.weight"].shape[::3]  # (width, 3, patch, patch)
    grid = math.isqrt(vision_sd["embeddings.position_embedding"].shape[1] - 1)  # (1, 1 + grid^2, width)
    mlp = vision_sd["encoder.layers.0.mlp.fc1.weight"].shape[0]
    layers = sum(k.endswith("layer_norm1.weight") for k in vision_sd)
    sizes = dict(hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers, image_size=grid * patch)
    # BLIP's ViT: heads of width 64, layer norm eps 1e-6
    vision = BlipVisionConfig(**sizes, patch_size=patch, num_attention_heads=width // 64, layer_norm_eps=1e-6)
    keys = "vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads"
    keys = keys.split() + ["max_position_embeddings", "layer_norm_eps", "hidden_act"]
    # is_decoder=True builds the cross-attention layers; rewards.py still calls it with is_decoder=False, so
    # the prompt is read bidirectionally, as ImageReward does.
    pad = med.get("pad_token_id", 0)
    text = BlipTextConfig(
        **{k: med[k] for k in keys}, encoder_hidden_size=width, is_decoder=True, pad_token_id=pad
    )
    vision = from_state_dict("imagereward", BlipVisionModel, vision, vision_sd, dtype)
    text = from_state_dict("imagereward", BlipTextModel, text, text_sd, dtype, add_pooling_layer=False)
    return vision, text


def qwen2vl_key(key: str) -> str:
    """HPSv3.safetensors was saved by transformers 4.45 (model.* = the language model, visual.*); 5.x nests
    both under model."""
    renames = {  # in this order: 5.x's longer prefixes first
        "model.language_model.": "language_model.",
        "model.visual.": "visual.",
        "model.": "language_model.",
        "visual.": "visual.",
    }
    for old, new in renames.items():
        if key.startswith(old):
            return new + key[len(old) :]
    raise UsageError(f"{key!r} is not part of a Qwen2-VL reward checkpoint")


def mlp_head(sd: dict, prefix: str, act=None) -> torch.nn.Sequential:
    """The Linear layers saved as `prefix`<index>, in index order, with `act` between them: a head, in fp32"""
    idx = sorted({int(k[len(prefix) :].split(".")[0]) for k in sd if k.startswith(prefix)})
    layers = []
    for i in idx:
        w, b = sd[f"{prefix}{i}.weight"], sd.get(f"{prefix}{i}.bias")
        layers.append(torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None))
        layers[-1].load_state_dict({"weight": w} | ({"bias": b} if b is not None else {}))
        if act and i != idx[-1]:
            layers.append(act())
    return torch.nn.Sequential(*layers).float().eval()
