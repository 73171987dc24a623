"""
The flow-matching SDE sampler: one `sde_step` that samples *and* scores, and batched rollouts that record
trajectories. A library: the trainers, eval.py, chunking.py and scripts/pretrain_toy.py sample through
`rollout`, any model that plumbing/models.py puts behind the `FlowModel` interface.

Notation (diffusers convention, as in SD3 and FLUX): x_s = (1 - s) x0 + s eps, s = sigma runs from 1 (noise)
to 0 (image), the transformer predicts the velocity v ~ eps - x0, one step s -> s' has dt = s' - s < 0. A
deterministic flow ODE becomes a stochastic policy by adding noise of std g(s) sqrt(-dt) and correcting the
drift with the score, which keeps the marginals of the ODE (Flow-GRPO, arXiv 2505.05470; DanceGRPO, arXiv
2505.07818). Each step is then a Gaussian policy pi(x' | x, s) whose log-density the GRPO objectives ratio
against.

The last transition sigma_T -> 0 is taken with the plain Euler step and never trained (both papers skip it).
GCPO and DanceGRPO sample it stochastically but decode the reward's image from x - sigma_T v, the clean
estimate at its input, which is exactly this deterministic step: the same image.
"""

from dataclasses import dataclass, fields, replace
from typing import Annotated, Literal

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from tqdm import tqdm

from plumbing.models import FlowModel, pipeline_sigmas
from plumbing.runtime import Range, UsageError, seed_for

SDE_MODES = ("flow", "dance", "cps", "ode")
# Each --sde-mode's own recipe, wherever --eta or --clip-range is not given: the SDE's noise level, and the
# PPO clip range trained with it (tiny, since a log-prob here is a mean over latent elements, not a sum).
# flow: Flow-GRPO and GCPO; dance: DanceGRPO; cps: Flow-GRPO's CPS sampler; ode: evaluation, never trained.
MODE_ETA = {"flow": 0.7, "dance": 0.3, "cps": 0.7, "ode": 0.0}
MODE_CLIP_RANGE = {"flow": 5e-5, "dance": 1e-4, "cps": 1e-5}


@dataclass
class SamplingArgs:
    """The sampler's flags, declared once: the Args of train_grpo.py (and train_chunk.py), eval.py and
    chunking.py inherit them, and a script changes only a default (eval.py: the papers' 50-step ODE)."""

    num_steps: Annotated[int, Range(">= 2")] = 17
    """denoising steps; the first num_steps-1 transitions are the trainable ones, the last one never is"""
    shift: Annotated[float, Range("> 0")] = 3.0
    """resolution shift of the `shift` schedule, s -> shift s / (1 + (shift - 1) s)"""
    schedule: Literal["shift", "pipeline"] = "shift"
    """sigmas: linspace under --shift (DanceGRPO, GCPO), or the stock pipeline scheduler's (Flow-GRPO on
    SD3.5; the papers' evaluation, FLUX's dynamic shift for the image size)"""
    sde_mode: Literal["flow", "dance", "cps", "ode"] = "flow"
    """the policy: flow (Flow-GRPO, GCPO), dance (DanceGRPO), cps (Flow-GRPO's CPS sampler), or the
    deterministic ode (evaluation; RL needs an SDE)"""
    eta: Annotated[float | None, Range("> 0")] = None
    """noise level of the SDE; default by --sde-mode (MODE_ETA): flow 0.7, dance 0.3, cps 0.7"""
    device: str = "auto"
    """cuda, cpu or auto"""


def mode_defaults(args):
    """`args` (a script's Args) with the eta, and the clip range where it has one, of its --sde-mode's own
    recipe wherever they were left unset. Every script resolves them here, once, as it starts."""
    resolved = {"eta": MODE_ETA[args.sde_mode] if args.eta is None else args.eta}
    if "clip_range" in {f.name for f in fields(args)} and args.clip_range is None:
        resolved["clip_range"] = MODE_CLIP_RANGE[args.sde_mode]
    return replace(args, **resolved)


def sampling_settings(args, model: FlowModel) -> dict:
    """rollout's keywords for the policy a script's (resolved) Args describe: steps, sigmas, SDE mode and eta.
    `--schedule pipeline` takes the stock pipeline scheduler's sigmas, else linspace under --shift."""
    settings = dict(num_steps=args.num_steps, mode=args.sde_mode, eta=args.eta)
    settings["sde_window"] = getattr(args, "sde_window", 0)  # the trainers' flag; evaluation has none
    if getattr(args, "schedule", "shift") == "pipeline":
        settings["sigmas"] = pipeline_sigmas(model, args.num_steps)
    else:
        settings["shift"] = args.shift
    return settings


def sigma_schedule(num_steps: int, shift: float = 3.0) -> torch.Tensor:
    """linspace(1, 0, N+1) under the resolution shift s -> shift s / (1 + (shift - 1) s), as SD3 and GCPO."""
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
        raise UsageError(
            "sde_step needs sigma_next < sigma: the sampler runs from noise (sigma=1) to image (0)"
        )
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
        at_one = torch.as_tensor(sigma_max or 0.0, device=x.device)
        g = eta * (s / (1 - torch.where(s == 1, at_one, s))).sqrt()  # Flow-GRPO: g = eta sqrt(s / (1 - s))
    score = -(x + (1 - s) * v) / s  # grad log p_s(x) of the linear interpolant, from x0_hat = x - s v
    mean = x + (v - 0.5 * g**2 * score) * dt  # Euler-Maruyama drift of the marginal-preserving reverse SDE
    return mean, g * (-dt).sqrt()


def sde_step(
    velocity,
    sample,
    sigma,
    sigma_next,
    *,
    mode="flow",
    eta=0.7,
    prev_sample=None,
    generator=None,
    sigma_max=None,
):
    """One reverse step x -> x' of the flow SDE; returns (x', log pi(x' | x)) with log_prob of shape (N,).

    `prev_sample` given: score that x' instead of drawing one (training re-scores stored transitions this
    way). `generator`: a torch.Generator or a list of N of them (one per trajectory, so draws ignore batch
    composition). Modes: flow (Flow-GRPO, eta 0.7), dance (DanceGRPO, eta 0.3), cps (Flow-GRPO's
    coefficient-preserving sampler), ode (g = 0: plain Euler; log_prob is zeros since a deterministic step has
    no density). Other arguments: see `sde_mean_std`.
    """
    mean, std = sde_mean_std(velocity, sample, sigma, sigma_next, mode=mode, eta=eta, sigma_max=sigma_max)
    if prev_sample is None:
        noise = randn_tensor(
            mean.shape, generator=generator, device=mean.device, dtype=torch.float32
        )  # (N, ...)
        prev_sample = mean + std * noise
    x_next = prev_sample.detach().float()
    dims = tuple(range(1, mean.ndim))
    if mode == "ode":
        log_prob = torch.zeros(mean.shape[0], device=mean.device)
    elif mode == "cps":
        log_prob = -((x_next - mean) ** 2).mean(
            dims
        )  # CPS's unnormalised "log-prob" (pair it with clip 1e-5)
    else:
        # Full Gaussian log-density, *averaged* (not summed) over all ~1e5 latent elements, as DanceGRPO and
        # Flow-GRPO do. A sum would make logp_new - logp_old huge and exp() of it overflow; the mean keeps the
        # ratio near 1, which is why the PPO clip range is tiny (1e-4 DanceGRPO, 5e-5 GCPO) rather than 0.2.
        log_density = -((x_next - mean) ** 2) / (2 * std**2) - std.log() - 0.5 * np.log(2 * np.pi)
        log_prob = log_density.mean(dims)
    return prev_sample, log_prob  # (N, ...), (N,)


# ----------------------------------------------------------------------------- rollouts
@dataclass
class Trajectories:
    """N = B*G recorded trajectories; transition t goes latents[:, t] -> latents[:, t+1] at sigmas[t]."""

    latents: torch.Tensor  # (N, T+1, *latent_shape) fp32
    log_probs: torch.Tensor  # (N, T) fp32, log pi_old of each transition
    sigmas: torch.Tensor  # (T+1,)
    embeds: dict  # prompt embeddings, each (N, ...)
    group: torch.Tensor  # (N,) index of the prompt in this batch
    prompts: list  # (N,) the prompt of each trajectory
    images: torch.Tensor  # (N, 3, H, W) in [0, 1]
    clean: torch.Tensor  # (N, *latent_shape) fp32, the final latents at sigma 0: what `images` decode from


def initial_noise_keys(init_same_noise, seed, prompt_key, g):
    """The seed keys of the initial noise of image g of a prompt: its own, its group's or the whole call's."""
    if init_same_noise == "none":
        return (prompt_key, 1, g)
    if init_same_noise == "group":
        return (prompt_key, 2)
    if init_same_noise == "all":
        return (seed, 3)
    raise UsageError(f"init_same_noise={init_same_noise!r}; choose none, group or all")


def velocity_batched(model, transformer, x, sigma, embeds, batch_size):
    """The velocity of every row of x (N, ...) at one sigma, in forwards of at most batch_size rows."""
    parts = []
    for b in range(0, len(x), batch_size):
        rows = {k: e[b : b + batch_size] for k, e in embeds.items()}
        xb = x[b : b + batch_size]
        parts.append(model.velocity(transformer, xb, sigma.expand(len(xb)), rows))
    return torch.cat(parts)  # (N, ...)


# ----------------------------------------------------------------------------- which transitions train
def num_selected(num_units: int, fraction: float) -> int:
    """How many of a trajectory's K units (steps, or chunks of steps) an iteration trains: max(1, int(K f))"""
    if not 0 < fraction <= 1:
        raise UsageError(f"the fraction of chunks or steps to train must be in (0, 1], got {fraction}")
    return max(1, int(num_units * fraction))


def random_units(n: int, num_units: int, fraction: float, generator=None, device=None) -> torch.Tensor:
    """For each of n trajectories, num_selected(num_units, fraction) distinct units drawn uniformly without
    replacement, in draw order: (n, k) long, row i the first k of a permutation from `generator`. The step
    objective's timestep_fraction of steps, and the chunk objective's uniform selection: chunks of size 1
    draw exactly the steps the step objective draws from the same generator state."""
    k = num_selected(num_units, fraction)
    return torch.stack([torch.randperm(num_units, generator=generator, device=device)[:k] for _ in range(n)])


@torch.no_grad()
def rollout(
    model: FlowModel,
    prompts,
    *,
    num_generations,
    num_steps=17,
    shift=3.0,
    mode="flow",
    eta=0.7,
    seed=0,
    prompt_seeds=None,
    init_same_noise="none",
    batch_size=None,
    transformers=None,
    progress=False,
    sigmas=None,
    sde_window=0,
) -> Trajectories:
    """Sample `num_generations` trajectories per prompt, batched, recording every step's state and log-prob.

    Image g of prompt p draws its noise from generators of its own, seeded from (prompt_seeds[p], g), where
    prompt_seeds defaults to seed_for(seed, p): results do not depend on `batch_size` (micro-batching of the
    transformer) or on the other prompts of the call (eval.py passes seeds keyed by a prompt's index in its
    set). `init_same_noise`: "none", "group" (a prompt's G trajectories start from one noise, isolating the
    policy's own noise) or "all" (every trajectory of this call, GCPO's per-GPU `init_same_noise`).
    `transformers`: one transformer per step (hybrid inference); default model.transformer throughout.
    `sigmas`: an explicit schedule (num_steps+1,), e.g. model.pipeline_sigmas(N); default sigma_schedule.
    `sde_window`: k > 0 takes only the first k transitions (the high-noise end) with the SDE, the rest as ODE
    steps of log-prob 0 (Flow-GRPO-Fast's SDE window, here fixed at the start); 0: all but the last.
    """
    G = num_generations
    n = len(prompts) * G
    keys = prompt_seeds if prompt_seeds is not None else [seed_for(seed, p) for p in range(len(prompts))]
    init_gens, step_gens = [], []  # one generator per trajectory j (image j % G of prompt j // G) and purpose
    for j in range(n):
        init_keys = initial_noise_keys(init_same_noise, seed, keys[j // G], j % G)
        init_gens.append(torch.Generator().manual_seed(seed_for(*init_keys)))
        step_gens.append(torch.Generator().manual_seed(seed_for(keys[j // G], 0, j % G)))
    x = randn_tensor((n, *model.latent_shape), generator=init_gens, device=model.device, dtype=torch.float32)
    unique = model.encode_prompts(list(prompts))  # encode each prompt once, then repeat it for its group
    embeds = {k: e.repeat_interleave(G, 0) for k, e in unique.items()}  # each (N, ...)
    if sigmas is None:
        sigmas = sigma_schedule(num_steps, shift)
    sigmas = sigmas.to(model.device)  # (num_steps+1,)
    if len(sigmas) != num_steps + 1:
        raise UsageError(f"a schedule of {len(sigmas)} sigmas does not make {num_steps} steps")
    if not 0 <= sde_window <= num_steps - 1:
        raise UsageError(f"an SDE window of {sde_window} steps does not fit {num_steps - 1} trainable steps")
    stochastic = sde_window or num_steps - 1  # the first `stochastic` transitions; the last is never one
    batch_size = batch_size or n
    states, log_probs = [x], []
    for i in tqdm(range(num_steps), desc="rollout", disable=not progress, leave=False):
        transformer = model.transformer if transformers is None else transformers[i]
        v = velocity_batched(model, transformer, x, sigmas[i], embeds, batch_size)  # (N, *latent_shape)
        last = i == num_steps - 1  # the final step into sigma=0 is never trained: take it deterministically
        step_mode = mode if i < stochastic else "ode"
        x, log_prob = sde_step(
            v, x, sigmas[i], sigmas[i + 1], mode=step_mode, eta=eta, generator=step_gens, sigma_max=sigmas[1]
        )
        if not last:
            states.append(x)
            log_probs.append(log_prob)
    images = torch.cat([model.decode(xb) for xb in x.split(batch_size)])  # (N, 3, H, W)
    group = torch.arange(len(prompts), device=model.device).repeat_interleave(G)  # (N,)
    return Trajectories(
        latents=torch.stack(states, 1),  # (N, T+1, *latent_shape)
        log_probs=torch.stack(log_probs, 1),  # (N, T)
        sigmas=sigmas[:-1],
        embeds=embeds,
        group=group,
        prompts=[p for p in prompts for _ in range(G)],
        images=images,
        clean=x,  # after the last (deterministic) step: sigma 0
    )
