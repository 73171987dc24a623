"""
The flow-matching SDE sampler: one `sde_step` that samples *and* scores, model adapters, batched rollouts.

    python sampler.py                       # sample the bundled toy model, write samples.png
    python sampler.py --model black-forest-labs/FLUX.1-dev --device cuda --height 720 --width 720

Notation (diffusers convention, ../shared/PAPERS.md section 1): x_s = (1 - s) x0 + s eps, s = sigma runs from 1
(noise) to 0 (image), the transformer predicts the velocity v ~ eps - x0, one step s -> s' has dt = s' - s < 0.
A deterministic flow ODE becomes a stochastic policy by adding noise of std g(s) sqrt(-dt) and correcting the drift
with the score, which keeps the marginals of the ODE (Flow-GRPO, DanceGRPO). Each step is then a Gaussian policy
pi(x' | x, s) whose log-density the GRPO objectives ratio against.

Departure from the peers: the last transition sigma_T -> 0 is taken with the plain Euler step. It is never trained
(both papers skip it), so its noise would only add pixel noise to the image the reward scores.
"""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor

TOY_DIR = Path(__file__).resolve().parent / "assets" / "toy"
SDE_MODES = ("flow", "dance", "cps", "ode")


class UsageError(Exception):
    """A mistake of the user's (a flag, a path, a file): scripts print its one-line message and exit 1."""


def sigma_schedule(num_steps: int, shift: float = 3.0) -> torch.Tensor:
    """linspace(1, 0, N+1) under the resolution shift s -> shift s / (1 + (shift - 1) s) (SD3 / DanceGRPO / GCPO)."""
    if num_steps < 2:
        raise UsageError(f"num_steps={num_steps}: need at least 2 steps (the last one is never trained)")
    s = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    return (shift * s / (1 + (shift - 1) * s)).float()  # (num_steps+1,)


def sde_mean_std(velocity, sample, sigma, sigma_next, *, mode="flow", eta=0.7, sigma_max=None):
    """Mean (N, ...) and std (N or 1, 1, ...) of the Gaussian policy pi(x' | x) of one reverse step, in fp32.

    `sigma`, `sigma_next`: floats or per-row tensors (N,) (a chunk batches one trajectory's steps as rows).
    `sigma_max`: Flow-GRPO's stand-in for sigma in 1 - sigma at sigma == 1 (the schedule's second sigma).
    """
    if mode not in SDE_MODES:
        raise UsageError(f"unknown SDE mode {mode!r}; choose one of {', '.join(SDE_MODES)}")
    # Everything in fp32: the log-prob of a bf16 mean would not reproduce between rollout and training.
    x, v = sample.float(), velocity.float()
    shape = (-1,) + (1,) * (x.ndim - 1)
    s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(shape)  # (N or 1, 1, ...)
    s_next = torch.as_tensor(sigma_next, dtype=torch.float32, device=x.device).reshape(shape)
    if (s_next >= s).any():
        raise UsageError("sde_step needs sigma_next < sigma: the sampler runs from noise (sigma=1) to image (0)")
    dt = s_next - s  # (N or 1, 1, ...) negative
    if mode == "ode":
        return x + v * dt, torch.zeros_like(s)
    if mode == "cps":
        # Flow-GRPO CPS: std = s' sin(eta pi/2); mean = (1 - s') x0_hat + sqrt(s'^2 - std^2) eps_hat.
        std = s_next * np.sin(eta * np.pi / 2)
        x0_hat, eps_hat = x - s * v, x + (1 - s) * v
        return (1 - s_next) * x0_hat + (s_next**2 - std**2).sqrt() * eps_hat, std
    if mode == "dance":
        g = torch.full_like(s, eta)  # DanceGRPO: constant diffusion coefficient g = eta
    else:
        if sigma_max is None and (s == 1).any():
            raise UsageError("sde_step(mode='flow') at sigma=1 needs sigma_max (the schedule's second sigma)")
        denom = 1 - torch.where(s == 1, torch.as_tensor(sigma_max or 0.0, device=x.device), s)
        g = eta * (s / denom).sqrt()  # Flow-GRPO: g = eta sqrt(s / (1 - s))
    score = -(x + (1 - s) * v) / s  # grad log p_s(x) of the linear interpolant, from x0_hat = x - s v
    mean = x + (v - 0.5 * g**2 * score) * dt  # Euler-Maruyama drift of the marginal-preserving reverse SDE
    return mean, g * (-dt).sqrt()


def sde_step(velocity, sample, sigma, sigma_next, *, mode="flow", eta=0.7, prev_sample=None, generator=None,
             sigma_max=None):
    """One reverse step x -> x' of the flow SDE; returns (x', log pi(x' | x)) with log_prob of shape (N,).

    `prev_sample` given: score that x' instead of drawing one (training re-scores stored transitions this way).
    `generator`: a torch.Generator or a list of N of them (one per trajectory, so draws ignore batch composition).
    Modes: flow (Flow-GRPO, eta 0.7), dance (DanceGRPO, eta 0.3), cps (Flow-GRPO's coefficient-preserving
    sampler), ode (g = 0: plain Euler; log_prob is zeros since a deterministic step has no density).
    Other arguments: see `sde_mean_std`.
    """
    mean, std = sde_mean_std(velocity, sample, sigma, sigma_next, mode=mode, eta=eta, sigma_max=sigma_max)
    if prev_sample is None:
        noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)  # (N, ...)
        prev_sample = mean + std * noise
    x_next = prev_sample.detach().float()
    dims = tuple(range(1, mean.ndim))
    if mode == "ode":
        log_prob = torch.zeros(mean.shape[0], device=mean.device)
    elif mode == "cps":
        log_prob = -((x_next - mean) ** 2).mean(dims)  # CPS's unnormalised "log-prob" (pair it with clip 1e-5)
    else:
        # Full Gaussian log-density, *averaged* (not summed) over all ~1e5 latent elements, as DanceGRPO and
        # Flow-GRPO do. A sum would make logp_new - logp_old huge and exp() of it overflow; the mean keeps the ratio
        # near 1, which is why the PPO clip range is tiny (1e-4 DanceGRPO, 5e-5 GCPO) rather than 0.2.
        log_prob = (-((x_next - mean) ** 2) / (2 * std**2) - std.log() - 0.5 * np.log(2 * np.pi)).mean(dims)
    return prev_sample, log_prob  # (N, ...), (N,)


# ----------------------------------------------------------------------------- model adapters
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


def flux_velocity(latent_h, latent_w, *, guidance, quantize_timestep, device, dtype):
    """FLUX: packed 2x2 latents, RoPE image ids, distilled guidance embedding instead of CFG."""
    from diffusers import FluxPipeline
    img_ids = FluxPipeline._prepare_latent_image_ids(None, latent_h // 2, latent_w // 2, device, dtype)  # (L, 3)

    def velocity(transformer, latents, sigma, embeds):
        n = latents.shape[0]
        # DanceGRPO/GCPO feed int(sigma*1000)/1000; the stock pipeline feeds sigma itself (quantize_timestep=False).
        t = torch.floor(sigma * 1000) / 1000 if quantize_timestep else sigma
        g = None if guidance is None else torch.full((n,), guidance, device=device, dtype=torch.float32)
        txt_ids = torch.zeros(embeds["prompt_embeds"].shape[1], 3, device=device, dtype=dtype)  # (S, 3)
        return transformer(hidden_states=latents.to(dtype), encoder_hidden_states=embeds["prompt_embeds"],
                           pooled_projections=embeds["pooled_prompt_embeds"], timestep=t.to(dtype), guidance=g,
                           img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]
    return velocity


def sd3_velocity(guidance_scale, dtype):
    """SD3/SD3.5: classifier-free guidance, the unconditional half batched into the same forward."""
    def velocity(transformer, latents, sigma, embeds):
        cfg = guidance_scale > 1
        x = torch.cat([latents, latents]) if cfg else latents  # (2N or N, C, h, w)
        cond = ("negative_prompt_embeds", "prompt_embeds") if cfg else ("prompt_embeds",)
        pooled = ("negative_pooled_prompt_embeds", "pooled_prompt_embeds") if cfg else ("pooled_prompt_embeds",)
        v = transformer(hidden_states=x.to(dtype), timestep=(sigma * 1000).repeat(len(cond)).to(dtype),
                        encoder_hidden_states=torch.cat([embeds[k] for k in cond]),
                        pooled_projections=torch.cat([embeds[k] for k in pooled]), return_dict=False)[0]
        if not cfg:
            return v
        v_uncond, v_cond = v.chunk(2)
        return v_uncond + guidance_scale * (v_cond - v_uncond)
    return velocity


def toy_images_to_latents(images):
    """The toy world's "VAE": a lossless space-to-depth. 32x32 pixels need no compression to be cheap, and an exact
    decoder means the verifier scores what the transformer made, not a VAE's reconstruction error."""
    from diffusers import FluxPipeline
    x = F.pixel_unshuffle(images * 2 - 1, 2)  # (N, 12, 16, 16)
    return FluxPipeline._pack_latents(x, x.shape[0], 12, 16, 16)  # (N, 64, 48): 8x8 tokens of 4x4x3 pixels


def toy_latents_to_images(latents):
    from diffusers import FluxPipeline
    x = FluxPipeline._unpack_latents(latents.float(), 32, 32, 2)  # (N, 12, 16, 16)
    return (F.pixel_shuffle(x, 2) / 2 + 0.5).clamp(0, 1)  # (N, 3, 32, 32)


def toy_model(transformer, text_encoder, tokenizer, max_length, *, device="cpu", dtype=torch.float32):
    """The toy world's FlowModel: a tiny FLUX transformer in pixel space behind the FLUX adapter."""
    def encode_prompts(prompts):
        tokens = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                           return_tensors="pt").to(device)
        out = text_encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        return {"prompt_embeds": out.last_hidden_state.to(dtype),  # (N, S, D)
                "pooled_prompt_embeds": out.pooler_output.to(dtype)}  # (N, D)
    velocity = flux_velocity(16, 16, guidance=None, quantize_timestep=True, device=device, dtype=dtype)
    return FlowModel("toy", transformer, velocity, encode_prompts, toy_latents_to_images, (64, 48),
                     torch.device(device), dtype)


def load_transformer(model: FlowModel, folder):
    """A trained transformer (a trainer checkpoint's `transformer/`) of the same class as model's, on its device."""
    if not Path(folder, "config.json").is_file():
        raise UsageError(f"no trained transformer in {str(folder)!r} (expected config.json and safetensors "
                         f"weights, as in a checkpoint's transformer/ folder)")
    return type(model.transformer).from_pretrained(folder, dtype=model.dtype).to(model.device).eval()


def load_model(name_or_path, *, device="cpu", dtype=torch.float32, height=None, width=None, guidance_scale=None,
               quantize_timestep=True) -> FlowModel:
    """A FLUX or SD3 pipeline (hub id or folder in diffusers format) or the toy bundle ("toy" or its folder)."""
    import diffusers
    import transformers
    diffusers.utils.logging.disable_progress_bar()  # loading bars would bury the training bars
    transformers.utils.logging.disable_progress_bar()
    path = TOY_DIR if name_or_path == "toy" else Path(name_or_path)
    if (path / "toy_config.json").exists():
        from diffusers import FluxTransformer2DModel
        from transformers import CLIPTextModel, PreTrainedTokenizerFast
        config = json.loads((path / "toy_config.json").read_text())
        transformer = FluxTransformer2DModel.from_pretrained(path / "transformer", dtype=dtype).to(device)
        text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", dtype=dtype).to(device).eval()
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path / "tokenizer")
        return toy_model(transformer, text_encoder, tokenizer, config["max_length"], device=device, dtype=dtype)
    if name_or_path == "toy":
        raise UsageError(f"the toy bundle is missing from {TOY_DIR}; rebuild it with `python toy.py`")

    from diffusers import DiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline
    try:
        pipe = DiffusionPipeline.from_pretrained(str(name_or_path), dtype=dtype)
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UsageError(f"cannot load model {str(name_or_path)!r} ({reason}); pass a local diffusers folder, or "
                         f"download it first with `hf download {name_or_path}`") from None
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    vsf = pipe.vae_scale_factor

    def decode(latents):
        if isinstance(pipe, FluxPipeline):
            latents = pipe._unpack_latents(latents, height, width, vsf)
        latents = latents / pipe.vae.config.scaling_factor + (pipe.vae.config.shift_factor or 0.0)
        images = pipe.vae.decode(latents.to(pipe.vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)  # (N, 3, H, W)

    channels = pipe.transformer.config.in_channels
    if isinstance(pipe, FluxPipeline):
        height, width = height or 1024, width or 1024
        h, w = 2 * (height // (vsf * 2)), 2 * (width // (vsf * 2))

        def encode_prompts(prompts):
            embeds, pooled, _ = pipe.encode_prompt(list(prompts), None, device=device, max_sequence_length=512)
            return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}  # (N, S, D), (N, D')
        guidance = (3.5 if guidance_scale is None else guidance_scale) if pipe.transformer.config.guidance_embeds \
            else None
        velocity = flux_velocity(h, w, guidance=guidance, quantize_timestep=quantize_timestep, device=device,
                                 dtype=dtype)
        return FlowModel("flux", pipe.transformer, velocity, encode_prompts, decode, ((h // 2) * (w // 2), channels),
                         torch.device(device), dtype)
    if isinstance(pipe, StableDiffusion3Pipeline):
        height, width = height or 512, width or 512
        scale = 4.5 if guidance_scale is None else guidance_scale

        def encode_prompts(prompts):
            out = pipe.encode_prompt(list(prompts), None, None, device=device, do_classifier_free_guidance=scale > 1)
            names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
            return {k: e for k, e in zip(names, out) if e is not None}
        return FlowModel("sd3", pipe.transformer, sd3_velocity(scale, dtype), encode_prompts, decode,
                         (channels, height // vsf, width // vsf), torch.device(device), dtype)
    raise UsageError(f"{name_or_path!r} is a {type(pipe).__name__}; this project samples FLUX and SD3 pipelines")


# ----------------------------------------------------------------------------- rollouts
@dataclass
class Trajectories:
    """N = B*G recorded trajectories: transition t goes latents[:, t] -> latents[:, t+1], sigmas[t] -> sigmas[t+1]."""
    latents: torch.Tensor  # (N, T+1, *latent_shape) fp32
    log_probs: torch.Tensor  # (N, T) fp32, log pi_old of each transition
    sigmas: torch.Tensor  # (T+1,)
    embeds: dict  # prompt embeddings, each (N, ...)
    group: torch.Tensor  # (N,) index of the prompt in this batch
    prompts: list  # (N,) the prompt of each trajectory
    images: torch.Tensor  # (N, 3, H, W) in [0, 1]


def seed_for(*keys: int) -> int:
    """A well-mixed 32-bit seed from integer keys, so (seed, trajectory) pairs never collide like seed + j would."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


@torch.no_grad()
def rollout(model: FlowModel, prompts, *, num_generations, num_steps=17, shift=3.0, mode="flow", eta=0.7, seed=0,
            prompt_seeds=None, init_same_noise="none", batch_size=None, transformers=None,
            progress=False) -> Trajectories:
    """Sample `num_generations` trajectories per prompt, batched, recording states and log-probs of every step.

    Image g of prompt p draws all its noise from its own generator, seeded from (prompt_seeds[p], g), where
    prompt_seeds defaults to seed_for(seed, p): results do not depend on `batch_size` (micro-batching of the
    transformer) or on the other prompts of the call (eval.py passes seeds keyed by a prompt's index in its set).
    `init_same_noise`: "none", "group" (a prompt's G trajectories start from one noise, isolating the policy's own
    noise) or "all" (every trajectory of this call, GCPO's per-GPU `init_same_noise`).
    `transformers`: one transformer per step (hybrid inference); default model.transformer throughout.
    """
    if init_same_noise not in ("none", "group", "all"):
        raise UsageError(f"init_same_noise={init_same_noise!r}; choose none, group or all")
    num_prompts, n, G = len(prompts), len(prompts) * num_generations, num_generations
    group = torch.arange(num_prompts).repeat_interleave(G)  # (N,)
    unique = model.encode_prompts(list(prompts))  # encode each prompt once, then repeat it for its group
    embeds = {k: e.repeat_interleave(G, 0) for k, e in unique.items()}  # each (N, ...)
    sigmas = sigma_schedule(num_steps, shift).to(model.device)  # (num_steps+1,)
    keys = prompt_seeds if prompt_seeds is not None else [seed_for(seed, p) for p in range(num_prompts)]
    gens = [torch.Generator().manual_seed(seed_for(keys[j // G], 0, j % G)) for j in range(n)]
    init_key = {"none": lambda j: (keys[j // G], 1, j % G), "group": lambda j: (keys[j // G], 2),
                "all": lambda j: (seed, 3)}[init_same_noise]
    init = [torch.Generator().manual_seed(seed_for(*init_key(j))) for j in range(n)]
    x = randn_tensor((n, *model.latent_shape), generator=init, device=model.device, dtype=torch.float32)
    batch_size = batch_size or n
    states, log_probs = [x], []
    from tqdm import tqdm
    for i in tqdm(range(num_steps), desc="rollout", disable=not progress, leave=False):
        transformer = model.transformer if transformers is None else transformers[i]
        v = torch.cat([model.velocity(transformer, xb, sigmas[i].expand(len(xb)),
                                      {k: e[b:b + batch_size] for k, e in embeds.items()})
                       for b, xb in zip(range(0, n, batch_size), x.split(batch_size))])  # (N, *latent_shape)
        last = i == num_steps - 1  # the final step into sigma=0 is never trained: take it deterministically
        x, log_prob = sde_step(v, x, sigmas[i], sigmas[i + 1], mode="ode" if last else mode, eta=eta,
                               generator=gens, sigma_max=sigmas[1])
        if not last:
            states.append(x)
            log_probs.append(log_prob)
    images = torch.cat([model.decode(x[b:b + batch_size]) for b in range(0, n, batch_size)])  # (N, 3, H, W)
    return Trajectories(torch.stack(states, 1), torch.stack(log_probs, 1), sigmas[:-1], embeds, group.to(model.device),
                        [p for p in prompts for _ in range(num_generations)], images)


@dataclass
class Args:
    model: str = "toy"
    """hub id or local folder of a FLUX / SD3 pipeline, or "toy" for the bundled CPU model"""
    prompt: tuple[str, ...] = ("a red circle on the left", "two blue squares", "a green triangle above a yellow square")
    """prompts to sample (one row of the grid each)"""
    num_generations: int = 4
    """images per prompt"""
    num_steps: int = 17
    """denoising steps (the last one is deterministic)"""
    shift: float = 3.0
    """resolution shift of the sigma schedule"""
    mode: str = "flow"
    """flow | dance | cps | ode"""
    eta: float = 0.7
    """noise level of the SDE (0.7 flow, 0.3 dance)"""
    height: int | None = None
    """image height in pixels (FLUX default 1024, SD3 512; the toy model is 32)"""
    width: int | None = None
    """image width in pixels"""
    seed: int = 0
    """seed of every trajectory's noise"""
    device: str = "cpu"
    """cpu or cuda"""
    out: str = "samples.png"
    """where to write the image grid"""


def main(args: Args):
    from runtime import image_grid
    model = load_model(args.model, device=args.device, height=args.height, width=args.width,
                       dtype=torch.float32 if args.device == "cpu" else torch.bfloat16)
    traj = rollout(model, list(args.prompt), num_generations=args.num_generations, num_steps=args.num_steps,
                   shift=args.shift, mode=args.mode, eta=args.eta, seed=args.seed, progress=True)
    image_grid(traj.images, cols=args.num_generations, scale=1 if model.kind != "toy" else 4).save(args.out)
    print(f"{len(traj.prompts)} samples of {args.model} ({args.mode}, {args.num_steps} steps) -> {args.out}")


if __name__ == "__main__":
    import tyro
    try:
        main(tyro.cli(Args))
    except UsageError as e:
        raise SystemExit(f"error: {e}")
