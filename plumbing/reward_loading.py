"""
How rewards.py reads the published reward models, without their packages (hpsv2, image-reward, hpsv3):

- files are found offline first: the folder or file given as --reward-path NAME=DIR or NAME=FILE, else the
  local Hugging Face cache, else the hub if it answers (`fetch`, `pretrained`); a folder that holds only the
  weights takes its config and tokenizer from the base repo they tune (Qwen2-VL for HPSv3, CLIP-H's tokenizer
  for HPSv2); what cannot be found ends in one line naming the files, where they were looked for and where
  to put them (`hf download REPO FILES`, never a whole 16 GB repo for a config);
- checkpoint keys are mapped into transformers modules: open_clip's CLIP into CLIPModel, BLIP's timm ViT and
  med.py BERT into BlipVisionModel and BlipTextModel, HPSv3's transformers 4.45 Qwen2-VL into Qwen2VLModel,
  the MLP heads into nn.Sequential; a key that is not mapped is refused, a missing weight is an error.

Nothing here knows a reward's name or default checkpoint: rewards.py holds those.
"""

import math
import os
import re
import socket
from collections.abc import Callable
from urllib.parse import urlparse

import torch

from plumbing.runtime import UsageError

PATH_FLAG = "--reward-path"
# What AutoTokenizer reads from a folder; the first is how a folder shows it has a tokenizer of its own.
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json")
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


def local_folder(src: str) -> str | None:
    """The folder a --reward-path value names (a file's own folder), or None for a hub repo id."""
    if os.path.isfile(src):
        return os.path.dirname(src) or "."
    return src if os.path.isdir(src) or src.startswith(("/", ".", "~")) else None


def _load(reward: str, repo: str, what: str, files: tuple, load: Callable[[bool], object], into=None):
    """`load(local_files_only)` from folder or hub repo `repo`: the folder, else the HF cache, else the hub if
    it answers, else one line naming `files`, where they were looked for and where to put them. `into`: the
    user's folder, when `repo` is the base repo that stands in for files the folder lacks."""
    import transformers

    transformers.utils.logging.disable_progress_bar()  # loading bars would bury the training bars
    try:
        return load(True)
    except (OSError, ValueError) as e:
        err = e
    in_folder = local_folder(repo) is not None
    online = not in_folder and _online()
    if online:
        try:
            return load(False)
        except (OSError, ValueError) as e:
            err = e
    if in_folder:
        where = f"folder {repo}"
    elif online:
        where = f"{repo} on the Hugging Face hub"
    else:
        where = (
            f"the Hugging Face cache for {repo} (offline: HF_HUB_OFFLINE is set or the hub is unreachable)"
        )
    if in_folder or online:  # the first line of the loader's own complaint
        where += f" ({(str(err).strip().splitlines() or [type(err).__name__])[0][:120]})"
    names, them = ", ".join(files), "it" if len(files) == 1 else "them"
    get = " ".join(["hf download", repo, *files])  # these files only, never the whole (16 GB) repo
    if in_folder:
        fix = f"put {names} there, or point {PATH_FLAG} {reward}=DIR at the folder that holds {them}"
        fix += " (or =FILE at the checkpoint file)"
    elif into:
        fix = f"put {names} of {repo} in {into} beside the checkpoint (`{get} --local-dir {into}`)"
    else:
        fix = f"download {them} (`{get}`) or point {PATH_FLAG} {reward}=DIR at a local copy"
    raise UsageError(f"reward {reward!r}: cannot load {what} from {where}; {fix}") from None


def fetch(reward: str, src: str, names, base: str | None = None) -> str:
    """The local path of a reward's file. `src`: the --reward-path value (a folder, or the checkpoint file
    itself, returned as is when `base` is None) or the default hub repo; `names`: the file's name, or the
    names it goes by; `base`: the hub repo that has the file when the folder (or hub repo `src`) lacks it."""
    names = (names,) if isinstance(names, str) else tuple(names)
    if base is None and os.path.isfile(src):
        return src
    folder = local_folder(src)
    here = [os.path.join(folder, n) for n in names if folder and os.path.isfile(os.path.join(folder, n))]
    if folder is not None and (here or base is None):
        repo = folder
    else:
        repo = base or src

    def load(local_files_only):
        if repo != folder:
            from huggingface_hub import hf_hub_download

            return hf_hub_download(repo, names[0], local_files_only=local_files_only)
        if not here:
            raise FileNotFoundError(f"no {' or '.join(names)} there")
        return here[0]

    return _load(reward, repo, " or ".join(names), names[:1], load, folder if repo != folder else None)


def pretrained(reward: str, cls, src: str, what: str, files: tuple, base: str | None = None, **kwargs):
    """`cls.from_pretrained` of the folder `src` names when it holds `files[0]` (or no `base` is given), else
    of hub repo `base` or `src`; `what` and `files` (what the folder needs) name it in the error."""
    folder = local_folder(src)
    if folder is not None and (base is None or os.path.isfile(os.path.join(folder, files[0]))):
        repo = folder
    else:
        repo = base or src

    def load(local_files_only):
        return cls.from_pretrained(repo, local_files_only=local_files_only, **kwargs)

    return _load(reward, repo, what, files, load, folder if repo != folder else None)


def load_tokenizer(reward: str, src: str, base: str):
    """The tokenizer of the folder `src` names, else that of the base repo its weights extend."""
    from transformers import AutoTokenizer

    return pretrained(reward, AutoTokenizer, src, "the tokenizer", TOKENIZER_FILES, base)


def from_state_dict(reward: str, cls, config, state_dict: dict, dtype, **kwargs):
    """A transformers model built from `config` holding exactly `state_dict` (no random init on the way)."""
    model = cls.from_pretrained(None, config=config, state_dict=state_dict, dtype=dtype, **kwargs)
    missing = sorted(set(model.state_dict()) - set(state_dict))  # from_pretrained leaves them random, quietly
    if missing:
        raise UsageError(f"reward {reward!r}: the checkpoint lacks {len(missing)} weights, e.g. {missing[0]}")
    return model.eval()


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
