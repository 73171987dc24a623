"""
Step-level GRPO for flow matching (DanceGRPO / Flow-GRPO), and the training loop that train_chunk.py reuses.

    python train_grpo.py --preset toy                        # 1 CPU: the toy world, minutes
    python train_grpo.py --num-iterations 150                # 1 GPU: GCPO's DanceGRPO baseline on FLUX.1-dev
    python train_grpo.py --preset sd35 --lora-rank 32        # 1 GPU: a LoRA on a frozen SD3.5-M
    torchrun --nproc_per_node 8 train_grpo.py                # 8 GPUs: the paper's recipe, 192 trajectories
    torchrun --nproc_per_node 8 train_grpo.py --preset sd35  # Flow-GRPO's SD3.5-M recipe
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 train_grpo.py

The algorithm, per iteration: each rank samples G trajectories for each of its B prompts with the stochastic
flow sampler (sampler.rollout, which records every state and log pi_old), scores the final images, turns
rewards into group-relative advantages, then re-scores a random `timestep_fraction` of each trajectory's T
trainable transitions under the current weights and takes PPO-clipped steps:

    ratio_t = exp(logp_theta_t - logp_old_t)
    loss_t  = max(-A ratio_t, -A clip(ratio_t, 1 - eps, 1 + eps))      (DanceGRPO / Flow-GRPO / GCPO Eq. 4)

Every trained step of trajectory i shares its trajectory's advantage A_i. There is no KL term in DanceGRPO /
GCPO; Flow-GRPO's (`--beta`) is beta * mean((mu_theta - mu_ref)^2) / (2 g^2) against the frozen base model.
"""

import math
import time
from collections import Counter
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch
import torch.distributed as dist
from tqdm import tqdm

from plumbing import lora, recipes
from plumbing.checkpoints import checkpoint_due, resume, save_checkpoint
from plumbing.ema import WeightAverage
from plumbing.metrics import Logger, NonFiniteGuard, iteration_metrics
from plumbing.models import load_model
from plumbing.prompts import PromptSource, outside_toy_grammar
from plumbing.runtime import (
    Range,
    UsageError,
    autocast,
    check_output_dir,
    print0,
    run,
    seed_for,
    setup_distributed,
    shard,
)
from plumbing.tables_and_figures import save_samples
from rewards import build_reward
from sampler import (
    SamplingArgs,
    mode_defaults,
    num_selected,
    random_units,
    rollout,
    sampling_settings,
    sde_mean_std,
    sde_step,
)


@dataclass
class Args(SamplingArgs):
    preset: str | None = None
    """`toy` (the CPU toy world) or `sd35` (Flow-GRPO's SD3.5-M); the defaults are GCPO's FLUX.1-dev recipe"""
    # --- model and data ---
    model: str = "black-forest-labs/FLUX.1-dev"
    """FLUX or SD3 pipeline: hub id or local diffusers folder; `toy` for the bundled CPU model"""
    prompts: str = "hpdv2:train"
    """text file of one prompt a line, a named set downloaded once (plumbing/prompts.py; GCPO: hpdv2:train),
    or toy"""
    reward: tuple[str, ...] = ("hpsv3",)
    """reward names with optional weights, `name` or `name:weight`; several are summed (see rewards.py)"""
    reward_path: tuple[str, ...] = ()
    """`name=path` local checkpoints for rewards, overriding their hub ids"""
    height: Annotated[int, Range("a positive multiple of 16")] = 720
    """image height in pixels"""
    width: Annotated[int, Range("a positive multiple of 16")] = 720
    """image width in pixels"""
    guidance_scale: Annotated[float, Range(">= 0")] = 3.5
    """FLUX: the distilled guidance embedding (no CFG); SD3: the classifier-free guidance scale"""
    # --- sampling (and sampler.SamplingArgs: num_steps, shift, schedule, sde_mode, eta, device) ---
    prompts_per_rank: Annotated[int, Range(">= 1")] = 2
    """B: prompts per rank per iteration; each prompt's whole group stays on its rank"""
    num_generations: Annotated[int, Range(">= 1")] = 12
    """G: images per prompt (the group size)"""
    init_same_noise: Literal["none", "group", "all"] = "all"
    """initial noise shared by a prompt's group or by every trajectory of a rank (GCPO: all)"""
    rollout_batch_size: Annotated[int, Range(">= 1")] = 12
    """trajectories per transformer forward during sampling (memory only; results do not depend on it)"""
    # --- objective ---
    timestep_fraction: Annotated[float, Range("in (0, 1]")] = 0.5
    """fraction of each trajectory's trainable steps trained per iteration (GCPO 0.5, DanceGRPO 0.6)"""
    sde_window: Annotated[int, Range(">= 0")] = 0
    """k > 0: only the first k trainable steps are SDE steps and train, ODE after (Flow-GRPO-Fast); 0: all"""
    clip_range: Annotated[float | None, Range("> 0")] = None
    """PPO clip epsilon, tiny as log-probs are element means; by mode: flow 5e-5, dance 1e-4, cps 1e-5"""
    adv_clip_max: Annotated[float, Range("> 0")] = 5.0
    """advantages are clipped to [-adv_clip_max, adv_clip_max]"""
    adv_std: Literal["group", "batch"] = "group"
    """normalise by each prompt's reward std (DanceGRPO, GCPO) or one std over the whole batch (Flow-GRPO)"""
    slas_gamma: Annotated[float | None, Range(">= 0")] = None
    """if set, SLAS: A = sign(d)|d|^(1+gamma), d = r - group mean, over the batch std (0.5 is our guess)"""
    beta: Annotated[float, Range(">= 0")] = 0.0
    """weight of Flow-GRPO's KL to the frozen base model (its PickScore 0.01, GenEval 0.04; GCPO: none)"""
    train_batch_size: Annotated[int, Range(">= 1")] = 1
    """transitions per forward/backward during training (memory only; the gradient does not depend on it)"""
    # --- optimisation ---
    learning_rate: Annotated[float, Range("> 0")] = 1e-5
    """AdamW learning rate"""
    adam_betas: Annotated[tuple[float, float], Range("in [0, 1)")] = (0.9, 0.999)
    """AdamW betas"""
    weight_decay: Annotated[float, Range(">= 0")] = 1e-4
    """AdamW weight decay"""
    max_grad_norm: Annotated[float, Range("> 0")] = 0.01
    """gradient clipping threshold (GCPO / DanceGRPO: 0.01)"""
    gradient_accumulation_steps: Annotated[int, Range(">= 1")] = 12
    """trajectories per optimizer step on each rank (GCPO: 12, so 2 optimizer steps per iteration)"""
    num_iterations: Annotated[int, Range(">= 1")] = 150
    """sample-then-train iterations"""
    ema_decay: Annotated[float, Range("in [0, 1)")] = 0.0
    """d > 0: checkpoints also keep an average of the weights, which eval.py evaluates (plumbing/ema.py)"""
    # --- LoRA ---
    lora_rank: Annotated[int, Range(">= 0")] = 0
    """0: full fine-tuning (GCPO); r > 0: a rank-r LoRA adapter on a frozen base (plumbing/lora.py)"""
    lora_alpha: Annotated[float | None, Range("> 0")] = None
    """LoRA scale alpha (the update is alpha / r B A); default 2 x rank, Flow-GRPO's 64 for rank 32"""
    lora_targets: tuple[str, ...] = ()
    """module names (suffixes) given an adapter; default: every attention projection (lora.DEFAULT_TARGETS)"""
    # --- system ---
    seed: Annotated[int, Range(">= 0")] = 0
    """base seed: the same weights on every rank; noise and prompts get a per-rank, per-iteration offset"""
    gradient_checkpointing: bool = True
    """recompute transformer activations in backward (needed for FLUX at 720 px)"""
    output_dir: str = "runs/grpo"
    """where metrics.jsonl, sample grids and checkpoints go"""
    checkpoint_every: Annotated[int, Range(">= 1")] = 50
    """save a checkpoint every k iterations (and at the end)"""
    max_skipped_steps: Annotated[int, Range(">= 1")] = 3
    """stop after this many optimizer steps in a row skipped for a non-finite loss or gradient norm"""
    timeout: Annotated[float, Range("> 0")] = 600.0
    """seconds a collective waits for the other ranks before the job stops (a hung or dead rank)"""
    image_every: Annotated[int, Range(">= 0")] = 10
    """save a grid of samples with prompts and rewards every k iterations"""
    resume: bool = False
    """continue from the newest checkpoint in output_dir"""
    wandb: bool = False
    """also log to Weights & Biases (pip install wandb)"""


PRESETS = recipes.TRAIN  # --preset toy, sd35, dance: the published recipes (plumbing/recipes.py)


# ----------------------------------------------------------------------------- advantages
def global_mean_std(x):
    """Mean and unbiased std of x over every rank's elements (batch statistics must not depend on ranks)."""
    stats = torch.stack([x.sum(), (x * x).sum(), torch.tensor(float(x.numel()), device=x.device)]).double()
    if dist.is_initialized():
        dist.all_reduce(stats)
    total, squares, n = stats
    mean = total / n
    var = (squares - n * mean**2).clamp(min=0) / (n - 1).clamp(min=1)
    return mean.float(), var.sqrt().float()


def compute_advantages(rewards, group, *, adv_std="group", slas_gamma=None, adv_clip_max=5.0):
    """Group-relative advantages (N,), and the fraction of groups with nothing to learn from (A = 0): their
    rewards all tie, or fewer than two are finite. A non-finite reward (a reward model's NaN) drops its
    trajectory from its group's statistics and gives it A = 0; the trainer does not train it."""
    num_groups = int(group.max()) + 1
    finite = torch.isfinite(rewards)  # (N,)
    r = torch.where(finite, rewards, 0.0)  # (N,)
    zeros = torch.zeros(num_groups, device=r.device)
    count = zeros.index_add(0, group, finite.float())  # (B,) finite rewards per group
    mean = zeros.index_add(0, group, r) / count  # (B,)
    d = torch.where(finite, r - mean[group], 0.0)  # (N,) r_i - mean_group(r)
    var = zeros.index_add(0, group, d * d) / (count - 1)  # (B,) unbiased
    zero_std = (count < 2) | (var.sqrt() < 1e-6)  # (B,) no signal: the group's images all scored the same
    if slas_gamma is not None:
        shaped = d.sign() * d.abs() ** (1 + slas_gamma)  # SLAS: A = sign(d)|d|^(1+gamma), no per-prompt std
        adv = shaped / (global_mean_std(shaped[finite])[1] + 1e-8)  # over the std of all ranks' batch
    elif adv_std == "batch":
        adv = d / (global_mean_std(r[finite])[1] + 1e-8)  # Flow-GRPO: group mean, one std for the whole batch
    else:
        adv = d / (var.sqrt()[group] + 1e-8)  # DanceGRPO / GCPO: A_i = (r_i - mean_g) / (std_g + 1e-8)
    adv = torch.where(zero_std[group] | ~finite, 0.0, adv)
    return adv.clamp(-adv_clip_max, adv_clip_max), zero_std.float().mean().item()


# ----------------------------------------------------------------------------- the step-level objective
def ppo_clip_loss(ratio, adv, clip_range):
    """max(-A r, -A clip(r, 1 - eps, 1 + eps)) elementwise: the pessimistic PPO surrogate, negated."""
    return torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_range, 1 + clip_range))


@dataclass
class Learner:
    """What an objective needs: the policy (model.transformer, sharded under torchrun) and the reference."""

    model: object
    ref: object  # the frozen reference transformer (a LoRA run's: its adapter off), or None without --beta
    args: Args  # resolved by sampler.mode_defaults: eta and clip_range are numbers

    def __post_init__(self):
        if self.args.eta is None or self.args.clip_range is None:
            raise ValueError("Learner needs args resolved by sampler.mode_defaults (eta and clip_range set)")

    def log_probs(self, traj, rows, steps):
        """log pi_theta of the stored transitions (rows[m], steps[m]) as one batch, each row at its own sigma,
        and the KL term of each: (M,), (M,). The same sde_step that sampled them scores them, so unchanged
        weights give ratio == 1 exactly."""
        a, m = self.args, self.model
        x, x_next = traj.latents[rows, steps], traj.latents[rows, steps + 1]  # (M, ...)
        s, s_next = traj.sigmas[steps], traj.sigmas[steps + 1]  # (M,)
        embeds = {k: e[rows] for k, e in traj.embeds.items()}
        sde = dict(mode=a.sde_mode, eta=a.eta, sigma_max=traj.sigmas[1])
        with autocast(m.device):
            v = m.velocity(m.transformer, x, s, embeds)
        _, logp = sde_step(v, x, s, s_next, prev_sample=x_next, **sde)
        if self.ref is None:
            return logp, torch.zeros_like(logp)
        with torch.no_grad(), autocast(m.device):
            v_ref = m.velocity(self.ref, x, s, embeds)
        mean, std = sde_mean_std(v, x, s, s_next, **sde)
        mean_ref, _ = sde_mean_std(v_ref, x, s, s_next, **sde)
        return logp, kl_to_reference(mean, mean_ref, std, s - s_next)


def kl_to_reference(mean, mean_ref, std, minus_dt):
    """Flow-GRPO's KL term (train_sd3.py): mean((mu_theta - mu_ref)^2) / (2 g^2) per transition, (M,), where g
    is the SDE's coefficient, the step's std without its sqrt(-dt). The exact KL of the two Gaussian steps
    divides by the step's variance g^2 (-dt) instead: this term is that KL times -dt (4x to 25x smaller on
    SD3.5's 10-step schedule), so that --beta means what it means in Flow-GRPO."""
    g_squared = std**2 / minus_dt.reshape(std.shape)  # std = g sqrt(-dt): (M or 1, 1, ...)
    return ((mean - mean_ref) ** 2 / (2 * g_squared)).mean(tuple(range(1, mean.ndim)))


def step_loss(learner, traj, adv, kept, rows, steps, scale):
    """Forward + backward the step-level loss of trajectories `rows` (n,) at their selected `steps` (n, k).

    Each transition's loss is scaled by `scale / k` (scale = 1 / trajectories per optimizer step), so the
    gradient is the mean over trajectories of the mean over their trained steps, however the transitions are
    batched. `kept` (N,): 1.0, or 0.0 for a trajectory dropped for its non-finite reward, whose forwards still
    run (under FSDP every rank must run as many) but whose loss counts for nothing.
    """
    a, k = learner.args, steps.shape[1]
    r = rows[:, None].expand_as(steps).flatten()  # (n*k,) the trajectory of each transition
    t = steps.flatten()  # (n*k,) its step
    ratios = []
    for b in range(0, len(r), a.train_batch_size):
        rb, tb = r[b : b + a.train_batch_size], t[b : b + a.train_batch_size]
        logp, kl = learner.log_probs(traj, rb, tb)
        ratio = (logp - traj.log_probs[rb, tb]).exp()  # (m,) r_t = exp(logp_theta - logp_old)
        loss = (ppo_clip_loss(ratio, adv[rb], a.clip_range) + a.beta * kl) * kept[rb]
        (loss.sum() * scale / k).backward()
        ratios.append(ratio.detach())
    return torch.cat(ratios)  # (n*k,)


def step_objective(learner, traj, adv, kept, rows, scale, generator):
    """Step-level GRPO: a random `timestep_fraction` of each trajectory's T steps (the SDE window's k), each
    its own unit. Returns the ratios and, for the metrics, counts of what trained (the chunk objective's)."""
    T = learner.args.sde_window or traj.log_probs.shape[1]  # the stochastic steps; a step: a chunk of size 1
    steps = random_units(len(rows), T, learner.args.timestep_fraction, generator).to(rows.device)  # (n, k)
    return step_loss(learner, traj, adv, kept, rows, steps, scale), {}


def describe_steps(args, T):
    """The step objective's line of the derived totals (train_chunk.py prints its chunks instead)."""
    k = num_selected(args.sde_window or T, args.timestep_fraction)
    where = f"the SDE window's first {args.sde_window} of T = {T}" if args.sde_window else f"T = {T}"
    return [f"trained steps per trajectory: {k} of {where}"]


# ----------------------------------------------------------------------------- the loop
def check_batch(args: Args):
    """The flags a run cannot start with, each refused with the flag to change."""
    if args.sde_mode == "ode":
        raise UsageError("--sde-mode ode is deterministic: RL needs a stochastic policy (flow, dance or cps)")
    if args.num_generations < 2:
        raise UsageError("--num-generations 1: group-relative advantages need at least 2 images per prompt")
    if args.sde_window >= args.num_steps:
        raise UsageError(f"--sde-window {args.sde_window} exceeds the {args.num_steps - 1} trainable steps")
    n_local = args.prompts_per_rank * args.num_generations
    if n_local % args.gradient_accumulation_steps:
        raise UsageError(
            f"--prompts-per-rank x --num-generations = {n_local} trajectories per rank is not divisible by "
            f"--gradient-accumulation-steps {args.gradient_accumulation_steps}; change one of them"
        )


def load_policy(args: Args, device, inference_dtype):
    """The model, its trained transformer (fp32 master weights, or a LoRA adapter on a frozen base in
    `inference_dtype`), the frozen reference of the KL term (None without --beta) and the trained parameters;
    sharded per block under torchrun unless LoRA. The same weights on every rank, from --seed."""
    torch.manual_seed(args.seed)  # identical weights on every rank (also true of a loaded checkpoint)
    size = dict(height=args.height, width=args.width, guidance_scale=args.guidance_scale)
    model = load_model(args.model, device=device, dtype=inference_dtype, **size)
    policy = model.transformer if args.lora_rank else model.transformer.float().requires_grad_(True)
    if args.lora_rank:
        lora.add_lora(policy, args.lora_rank, args.lora_alpha, args.lora_targets)
    if args.gradient_checkpointing:
        policy.enable_gradient_checkpointing()
    ref = None  # a LoRA run's reference is its own base, the adapter off
    if args.beta > 0:
        ref = lora.AdapterOff(policy) if args.lora_rank else deepcopy(policy).requires_grad_(False).eval()
    shard_policy(policy, ref, args, device)
    params = [p for p in policy.parameters() if p.requires_grad]  # after sharding: all, or the adapter's
    return model, policy, ref, params


def shard_policy(policy, ref, args: Args, device):
    """Under torchrun, FSDP2 shards a full fine-tune's policy and reference per block; a LoRA run's ranks each
    hold the whole frozen base and average the adapter's gradients instead (clip_gradients)."""
    if dist.is_initialized() and not args.lora_rank:
        shard(policy, device)
        if ref is not None:
            shard(ref, device)


def print_settings(args: Args, world: int, params, objective_lines, start: int):
    """The derived totals and the effective policy, once, as the run starts (rank 0)."""
    B, G, accumulation = args.prompts_per_rank, args.num_generations, args.gradient_accumulation_steps
    print0(f"trajectories per iteration: {world} ranks x {B} prompts x {G} images = {world * B * G}")
    print0(f"optimizer steps per iteration: {B * G // accumulation} (of {accumulation} trajectories each)")
    print0(f"trained parameters: {sum(p.numel() for p in params):,} ({'LoRA' if args.lora_rank else 'all'})")
    print0("\n".join(objective_lines))
    print0(f"policy: {args.sde_mode} SDE, eta {args.eta:g}, clip {args.clip_range:g}, {args.schedule} sigmas")
    if args.ema_decay:
        print0(f"evaluated model: an EMA of the weights, decay {args.ema_decay:g} (checkpoints' ema/)")
    print0(f"starting at iteration {start} of {args.num_iterations}")


def clip_gradients(params, args: Args):
    """Average a LoRA run's gradients over ranks (FSDP averages a full run's), clip them to --max-grad-norm,
    and return their global norm, the same on every rank."""
    if args.lora_rank and dist.is_initialized():
        lora.average_gradients(params)
    norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor under FSDP2


def print_progress(metrics, args: Args):
    """Rank 0's line per iteration, and a warning when the first optimizer step's ratios are not ~1."""
    if metrics["ratio_first"] > args.clip_range / 10:  # e.g. bf16 kernels that depend on the batch size
        print0(
            f"warning: ratio_first {metrics['ratio_first']:.1e} is over a tenth of the clip range; the "
            f"rollout and training forwards disagree (try --train-batch-size {args.rollout_batch_size})"
        )
    if not dist.is_initialized() or dist.get_rank() == 0:
        m = metrics
        tqdm.write(
            f"it {m['iteration']}: reward {m['reward']:.4f} ratio_first {m['ratio_first']:.1e} "
            f"clip_frac {m['clip_frac']:.3f} ({m['time/iteration']:.1f}s)"
        )


def main(args: Args, objective=step_objective, describe=describe_steps):
    """The GRPO loop. `objective(learner, traj, adv, kept, rows, scale, generator) -> (ratios, counts)` does
    the forward/backward of one optimizer step's trajectories; train_chunk.py passes its chunk-level one."""
    check_batch(args)
    args = mode_defaults(args)  # eta and clip_range follow --sde-mode unless given
    objective_lines = describe(args, args.num_steps - 1)  # validates the objective's flags before any load
    device, rank, world = setup_distributed(args)
    check_output_dir(args)  # a used or unwritable --output-dir is refused before anything is written
    prompts = PromptSource(args.prompts, toy_split="train")
    outside = None if prompts.is_toy else outside_toy_grammar(prompts.lines)
    if "toy" in [spec.partition(":")[0] for spec in args.reward] and outside is not None:
        raise UsageError(f"the toy reward scores toy-grammar prompts; {args.prompts} has {outside[:80]!r}")
    # Inference-only parts (rollouts, rewards, the reference) run in bf16 on CUDA.
    inference_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    paths = list(args.reward_path)
    reward_fn = build_reward(list(args.reward), device=device, dtype=inference_dtype, paths=paths)
    model, policy, ref, params = load_policy(args, device, inference_dtype)
    adamw = dict(lr=args.learning_rate, betas=args.adam_betas, weight_decay=args.weight_decay)
    optimizer = torch.optim.AdamW(params, **adamw)
    learner, guard = Learner(model, ref, args), NonFiniteGuard(args)
    ema = WeightAverage(params, args.ema_decay) if args.ema_decay else None
    start = resume(policy, optimizer, args, rank, ema) if args.resume else 0
    logger = Logger(args if rank == 0 else None, start)
    print_settings(args, world, params, objective_lines, start)
    B, G, accumulation = args.prompts_per_rank, args.num_generations, args.gradient_accumulation_steps
    sampling = sampling_settings(args, model) | dict(batch_size=args.rollout_batch_size, progress=rank == 0)
    shaping = dict(adv_std=args.adv_std, slas_gamma=args.slas_gamma, adv_clip_max=args.adv_clip_max)

    bar = dict(desc="iterations", disable=rank != 0, initial=start, total=args.num_iterations)
    for it in tqdm(range(start, args.num_iterations), **bar):
        t0 = time.perf_counter()
        # Prompts: one global draw per iteration, sliced per rank, so ranks never share a prompt; every
        # prompt's whole group is sampled on its rank, so group statistics need no communication.
        batch = prompts.draw(world * B, seed_for(args.seed, it))[rank * B : (rank + 1) * B]
        # Noise gets a per-rank, per-iteration seed: ranks explore different trajectories.
        noise = dict(seed=seed_for(args.seed, it, rank), init_same_noise=args.init_same_noise)
        policy.eval()
        with autocast(device):
            traj = rollout(model, batch, num_generations=G, **sampling, **noise)
        t1 = time.perf_counter()
        with torch.no_grad():
            rewards, components = reward_fn(traj.images, traj.prompts)  # (N,), {name: (N,)}
        rewards = rewards.to(device).float()
        adv, frac_zero = compute_advantages(rewards, traj.group, **shaping)  # (N,)
        kept = torch.isfinite(rewards).float()  # (N,) a non-finite reward drops its trajectory
        t2 = time.perf_counter()

        policy.train()
        gen = torch.Generator().manual_seed(seed_for(args.seed, it, rank, 1))  # which trajectories/steps
        order = torch.randperm(B * G, generator=gen).to(device)
        ratios, norms, counts = [], [], Counter()
        for rows in order.split(accumulation):  # one optimizer step per `accumulation` trajectories
            scale = 1.0 / max(int(kept[rows].sum()), 1)  # the mean over the trajectories kept
            ratio, unit_counts = objective(learner, traj, adv, kept, rows, scale, gen)
            ratios.append(ratio)
            norm = clip_gradients(params, args)
            if not guard.skip(norm, it + 1):
                optimizer.step()
                if ema is not None:
                    ema.update()
                norms.append(norm)
                counts.update(unit_counts)
            optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()

        shared = {"lr": optimizer.param_groups[0]["lr"], "skipped_steps": len(ratios) - len(norms)}
        grad_norm = torch.stack(norms).mean().item() if norms else math.nan
        means = {"frac_reward_zero_std": frac_zero, "grad_norm": grad_norm, "time/rollout": t1 - t0}
        means |= {"time/reward": t2 - t1, "time/train": t3 - t2, "time/iteration": t3 - t0}
        metrics = iteration_metrics(
            it + 1, rewards, components, ratios, args.clip_range, shared, means, counts
        )
        logger.log(metrics)
        print_progress(metrics, args)
        if rank == 0 and args.image_every and (it + 1) % args.image_every == 0:
            path = Path(args.output_dir, "samples", f"iter_{it + 1:05d}.png")
            save_samples(traj, rewards, path, cols=G, scale=4 if model.kind == "toy" else 1)
        if checkpoint_due(it + 1, args):
            save_checkpoint(policy, optimizer, args, it + 1, rank, ema)
    if dist.is_initialized():
        dist.barrier()  # no rank tears the group down while another still has a collective in flight
        dist.destroy_process_group()


if __name__ == "__main__":
    run(main, Args, PRESETS)
