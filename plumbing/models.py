"""
The text-to-image flow models behind one interface, `FlowModel`: what the sampler needs of FLUX, SD3 and the
toy model (a velocity function, prompt encoding, decoding, the latent shape), and loading each from its
folder.

    load_model("black-forest-labs/FLUX.1-dev", device="cuda", dtype=torch.bfloat16, height=720, width=720)
    load_model("toy")   # the bundled CPU model (assets/toy, written by `python -m scripts.pretrain_toy`)

The velocity follows the diffusers convention the sampler's maths assume: v ~ eps - x0 at sigma s in [0, 1].
"""

import copy
import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from plumbing import lora
from plumbing.runtime import UsageError

TOY_DIR = Path(__file__).resolve().parents[1] / "assets" / "toy"


@dataclass
class FlowModel:
    """What the sampler and trainers need of a text-to-image flow model, whatever its family."""

    kind: str  # "flux" | "sd3" | "toy"
    transformer: torch.nn.Module
    velocity: Callable  # (transformer, latents (N, *latent_shape), sigma (N,), embeds) -> v like latents
    encode_prompts: Callable  # list[str] -> dict of tensors with leading dim N (no no_grad inside)
    decode: Callable  # latents (N, *latent_shape) -> images (N, 3, H, W) in [0, 1]
    latent_shape: tuple
    device: torch.device
    dtype: torch.dtype
    stock_sigmas: Callable | None = None  # num_steps -> its pipeline's sigmas (num_steps+1,); None: the toy


# FLUX packs each 2x2 patch of latent pixels into one token (FluxPipeline._pack_latents and _unpack_latents,
# written here so that the toy path never imports the pipeline module and its image-processor warnings).
def pack(x):
    """(N, C, h, w) latent pixels -> (N, h/2 w/2, 4C) FLUX tokens, row-major over the patches."""
    n, c, h, w = x.shape
    x = x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (N, h/2, w/2, C, 2, 2)
    return x.reshape(n, (h // 2) * (w // 2), 4 * c)


def unpack(tokens, h, w):
    """The inverse of `pack`: (N, h/2 w/2, 4C) -> (N, C, h, w)."""
    n, _, d = tokens.shape
    x = tokens.view(n, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # (N, C, h/2, 2, w/2, 2)
    return x.reshape(n, d // 4, h, w)


def flux_velocity(latent_h, latent_w, *, guidance, quantize_timestep, device, dtype):
    """FLUX: packed 2x2 latents, RoPE image ids, distilled guidance embedding instead of CFG."""
    rows, cols = torch.meshgrid(torch.arange(latent_h // 2), torch.arange(latent_w // 2), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).flatten(0, 1).to(device, dtype)  # (L, 3)

    def velocity(transformer, latents, sigma, embeds):
        n = latents.shape[0]
        # DanceGRPO/GCPO feed int(sigma*1000)/1000; the stock pipeline feeds sigma itself
        # (quantize_timestep=False).
        t = torch.floor(sigma * 1000) / 1000 if quantize_timestep else sigma
        g = None if guidance is None else torch.full((n,), guidance, device=device, dtype=torch.float32)
        txt_ids = torch.zeros(embeds["prompt_embeds"].shape[1], 3, device=device, dtype=dtype)  # (S, 3)
        out = transformer(
            hidden_states=latents.to(dtype),
            encoder_hidden_states=embeds["prompt_embeds"],
            pooled_projections=embeds["pooled_prompt_embeds"],
            timestep=t.to(dtype),
            guidance=g,
            img_ids=img_ids,
            txt_ids=txt_ids,
            return_dict=False,
        )
        return out[0]

    return velocity


def sd3_velocity(guidance_scale, dtype):
    """SD3/SD3.5: classifier-free guidance, the unconditional half batched into the same forward."""
    cfg = guidance_scale > 1
    if cfg:
        names = ("negative_prompt_embeds", "prompt_embeds")
        pooled_names = ("negative_pooled_prompt_embeds", "pooled_prompt_embeds")
    else:
        names, pooled_names = ("prompt_embeds",), ("pooled_prompt_embeds",)

    def velocity(transformer, latents, sigma, embeds):
        x = torch.cat([latents] * len(names))  # (2N or N, C, h, w)
        out = transformer(
            hidden_states=x.to(dtype),
            timestep=(sigma * 1000).repeat(
                len(names)
            ),  # fp32, as the stock pipeline (bf16 rounds 913.3 to 912)
            encoder_hidden_states=torch.cat([embeds[k] for k in names]),
            pooled_projections=torch.cat([embeds[k] for k in pooled_names]),
            return_dict=False,
        )
        if not cfg:
            return out[0]
        v_uncond, v_cond = out[0].chunk(2)
        return v_uncond + guidance_scale * (v_cond - v_uncond)

    return velocity


def toy_images_to_latents(images):
    """The toy world's "VAE": a lossless space-to-depth. 32x32 pixels need no compression to be cheap, and an
    exact decoder means the verifier scores what the transformer made, not a VAE's reconstruction error."""
    return pack(F.pixel_unshuffle(images * 2 - 1, 2))  # (N, 64, 48): 8x8 tokens of 4x4x3 pixels


def toy_latents_to_images(latents):
    x = unpack(latents.float(), 16, 16)  # (N, 12, 16, 16)
    return (F.pixel_shuffle(x, 2) / 2 + 0.5).clamp(0, 1)  # (N, 3, 32, 32)


def toy_flow_model(
    transformer, text_encoder, tokenizer, max_length, *, vae=None, device="cpu", dtype=torch.float32
):
    """The toy world's FlowModel: a tiny FLUX transformer behind the FLUX adapter, in pixel space, or with
    `vae` (an AutoencoderKL) on its packed latents as FLUX itself."""

    def encode_prompts(prompts):
        tokens = tokenizer(
            list(prompts), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
        )
        out = text_encoder(
            input_ids=tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device)
        )
        prompt_embeds = out.last_hidden_state.to(dtype)  # (N, S, D)
        pooled_prompt_embeds = out.pooler_output.to(dtype)  # (N, D)
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_prompt_embeds}

    if vae is not None:
        latent = latent_flow_model(
            "flux", transformer, vae, encode_prompts, 32, 32, None, device=device, dtype=dtype
        )
        return dataclasses.replace(latent, kind="toy")
    velocity = flux_velocity(16, 16, guidance=None, quantize_timestep=True, device=device, dtype=dtype)
    decode = toy_latents_to_images
    return FlowModel(
        "toy", transformer, velocity, encode_prompts, decode, (64, 48), torch.device(device), dtype
    )


def load_toy(path, *, device="cpu", dtype=torch.float32) -> FlowModel:
    """The toy bundle as scripts/pretrain_toy.py writes it: transformer, text encoder, tokenizer, config."""
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextModel, PreTrainedTokenizerFast

    config = json.loads((path / "toy_config.json").read_text())
    transformer = FluxTransformer2DModel.from_pretrained(path / "transformer", dtype=dtype).to(device)
    text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", dtype=dtype).to(device).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path / "tokenizer")
    vae = None
    if (path / "vae").is_dir():
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(path / "vae", dtype=dtype).to(device).eval()
    return toy_flow_model(
        transformer, text_encoder, tokenizer, config["max_length"], vae=vae, device=device, dtype=dtype
    )


def load_transformer(model: FlowModel, folder):
    """A trained transformer (a checkpoint's `transformer/`) of the same class as model's, on its device; or,
    from a LoRA run's `lora/`, a copy of model's with the adapter on (as much memory as a full one)."""
    if Path(folder, lora.WEIGHTS).is_file():
        trained = copy.deepcopy(model.transformer)
        lora.load_adapter(trained, folder)
        return trained.eval()
    if not Path(folder, "config.json").is_file():
        raise UsageError(
            f"no trained transformer in {str(folder)!r} (expected config.json and safetensors weights, "
            f"as in a checkpoint's transformer/ folder)"
        )
    cls = type(model.transformer)
    saved = json.loads(Path(folder, "config.json").read_text()).get("_class_name")
    if saved != cls.__name__:
        raise UsageError(
            f"{str(folder)!r} holds a {saved}, but the base model's transformer is a {cls.__name__}"
        )
    return cls.from_pretrained(folder, dtype=model.dtype).to(model.device).eval()


def latent_flow_model(
    kind, transformer, vae, encode_prompts, height, width, guidance, *, device, dtype, quantize_timestep=True
):
    """The FlowModel of a FLUX ("flux") or SD3 ("sd3") transformer and VAE for height x width images: the
    family's velocity adapter (`guidance`: FLUX's distilled guidance or None, SD3's CFG scale), decoding
    through the VAE and the latent shape, as the stock pipelines compute them."""
    vsf = 2 ** (len(vae.config.block_out_channels) - 1)  # the pipelines' vae_scale_factor
    h, w, channels = height // vsf, width // vsf, transformer.config.in_channels  # latent pixels
    if kind == "flux":  # FLUX packs 2x2 latent pixels into a token: even sizes
        h, w = 2 * (h // 2), 2 * (w // 2)
        velocity = flux_velocity(
            h, w, guidance=guidance, quantize_timestep=quantize_timestep, device=device, dtype=dtype
        )
        latent_shape = ((h // 2) * (w // 2), channels)
    else:
        velocity, latent_shape = sd3_velocity(guidance, dtype), (channels, h, w)

    def decode(latents):
        if kind == "flux":
            latents = unpack(latents, h, w)  # (N, C, h, w)
        latents = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        images = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)  # (N, 3, H, W)

    return FlowModel(
        kind, transformer, velocity, encode_prompts, decode, latent_shape, torch.device(device), dtype
    )


def load_model(
    name_or_path,
    *,
    device="cpu",
    dtype=torch.float32,
    height=None,
    width=None,
    guidance_scale=None,
    quantize_timestep=True,
) -> FlowModel:
    """A FLUX or SD3 pipeline (hub id or diffusers folder) or the toy bundle ("toy" or its folder)."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()  # loading bars would bury the training bars
    transformers.utils.logging.disable_progress_bar()
    path = TOY_DIR if name_or_path == "toy" else Path(name_or_path)
    if (path / "toy_config.json").exists():
        return load_toy(path, device=device, dtype=dtype)
    if name_or_path == "toy":
        raise UsageError(
            f"the toy bundle is missing from {TOY_DIR}; rebuild it with `python -m scripts.pretrain_toy`"
        )
    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(str(name_or_path), dtype=dtype)
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UsageError(
            f"cannot load model {str(name_or_path)!r} ({reason}); pass a local diffusers folder, or "
            f"download it first with `hf download {name_or_path}`"
        ) from None
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    is_flux = isinstance(pipe, diffusers.FluxPipeline)
    if not is_flux and not isinstance(pipe, diffusers.StableDiffusion3Pipeline):
        raise UsageError(
            f"{name_or_path!r} is a {type(pipe).__name__}; this project samples FLUX and SD3 pipelines"
        )
    height = height or (1024 if is_flux else 512)
    width = width or (1024 if is_flux else 512)
    device = torch.device(device)
    if is_flux:

        def encode_prompts(prompts):
            embeds, pooled, _ = pipe.encode_prompt(
                list(prompts), None, device=device, max_sequence_length=512
            )
            return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}  # (N, S, D), (N, D')

        guidance = None  # FLUX.1-schnell has no guidance embedding
        if pipe.transformer.config.guidance_embeds:
            guidance = 3.5 if guidance_scale is None else guidance_scale
    else:
        guidance = 4.5 if guidance_scale is None else guidance_scale

        def encode_prompts(prompts):
            out = pipe.encode_prompt(
                list(prompts), None, None, device=device, do_classifier_free_guidance=guidance > 1
            )
            names = (
                "prompt_embeds",
                "negative_prompt_embeds",
                "pooled_prompt_embeds",
                "negative_pooled_prompt_embeds",
            )
            return {k: e for k, e in zip(names, out, strict=True) if e is not None}

    kind, parts = ("flux" if is_flux else "sd3"), (pipe.transformer, pipe.vae, encode_prompts)
    model = latent_flow_model(
        kind, *parts, height, width, guidance, device=device, dtype=dtype, quantize_timestep=quantize_timestep
    )
    tokens = model.latent_shape[0]  # FLUX: the image's tokens
    if not is_flux:  # SD3 patches p x p latent pixels into a token
        _, h, w = model.latent_shape
        tokens = (h // pipe.transformer.config.patch_size) * (w // pipe.transformer.config.patch_size)
    model.stock_sigmas = partial(scheduler_sigmas, pipe, tokens)
    return model


def pipeline_sigmas(model: FlowModel, num_steps: int) -> torch.Tensor:
    """The schedule the model's stock pipeline samples with by default, (num_steps+1,), or one clear line."""
    if model.stock_sigmas is None:
        raise UsageError(
            f"the {model.kind} model has no pipeline scheduler; use the shift schedule (--schedule shift)"
        )
    return model.stock_sigmas(num_steps)


def scheduler_sigmas(pipe, image_tokens: int, num_steps: int) -> torch.Tensor:
    """The sigmas FluxPipeline / StableDiffusion3Pipeline sample with when called with num_inference_steps and
    nothing else, the final 0 included: (num_steps+1,). FLUX: linspace(1, 1/N, N) under the scheduler's
    dynamic shift for the image's token count; SD3: the scheduler's own schedule (SD3.5: static shift 3)."""
    import diffusers
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler, config = copy.deepcopy(pipe.scheduler), pipe.scheduler.config
    kwargs = {}
    if isinstance(pipe, diffusers.FluxPipeline):
        kwargs["sigmas"] = np.linspace(1.0, 1 / num_steps, num_steps)
    if config.get("use_dynamic_shifting"):
        shift_range = [
            config.get(k, d) for k, d in (("base_image_seq_len", 256), ("max_image_seq_len", 4096))
        ]
        shifts = [config.get("base_shift", 0.5), config.get("max_shift", 1.15 if kwargs else 1.16)]
        kwargs["mu"] = calculate_shift(image_tokens, *shift_range, *shifts)
    scheduler.set_timesteps(num_steps if "sigmas" not in kwargs else None, **kwargs)
    return scheduler.sigmas.float().cpu()
