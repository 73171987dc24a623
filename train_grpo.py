"""
Step-level GRPO for flow matching (DanceGRPO / Flow-GRPO), and the training loop that train_chunk.py reuses.

    python train_grpo.py --preset toy                          # 1 CPU: the toy world, minutes
    python train_grpo.py --num-iterations 150                  # 1 GPU: GCPO's DanceGRPO baseline on FLUX.1-dev
    torchrun --nproc_per_node 8 train_grpo.py                  # 8 GPUs: the paper's recipe (192 trajectories/iter)
    torchrun --nproc_per_node 8 train_grpo.py --preset sd35    # Flow-GRPO's SD3.5-M recipe
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 train_grpo.py

The algorithm, per iteration: each rank samples G trajectories for each of its B prompts with the stochastic flow
sampler (sampler.rollout, which records every state and log pi_old), scores the final images, turns rewards into
group-relative advantages, then re-scores a random `timestep_fraction` of each trajectory's T trainable transitions
under the current weights and takes PPO-clipped steps:

    ratio_t = exp(logp_theta_t - logp_old_t)
    loss_t  = max(-A ratio_t, -A clip(ratio_t, 1 - eps, 1 + eps))      (DanceGRPO / Flow-GRPO / GCPO Eq. 4)

Every trained step of trajectory i shares its trajectory's advantage A_i. There is no KL term in DanceGRPO / GCPO;
Flow-GRPO's (`--beta`) is beta * mean((mu_theta - mu_ref)^2) / (2 std^2) against the frozen base model.
"""
import time
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from tqdm import tqdm

from runtime import (Logger, PromptSource, autocast, checkpoints, gather, image_grid, load_checkpoint, preset_cli,
                     reduce_mean, run, save_checkpoint, setup_distributed, shard)
from sampler import UsageError, load_model, rollout, sde_mean_std, sde_step, seed_for


@dataclass
class Args:
    preset: str | None = None
    """`toy` (the CPU toy world) or `sd35` (Flow-GRPO's SD3.5-M recipe); the defaults are GCPO's FLUX.1-dev recipe"""
    # --- model and data ---
    model: str = "black-forest-labs/FLUX.1-dev"
    """FLUX or SD3 pipeline: hub id or local diffusers folder; `toy` for the bundled CPU model"""
    prompts: str = "hpdv2_train.txt"
    """text file with one prompt per line (GCPO: the HPDv2 train prompts), or `toy` for the toy grammar"""
    reward: tuple[str, ...] = ("hpsv3",)
    """reward names with optional weights, `name` or `name:weight`; several are summed (see rewards.py)"""
    reward_path: tuple[str, ...] = ()
    """`name=path` local checkpoints for rewards, overriding their hub ids"""
    height: int = 720
    """image height in pixels"""
    width: int = 720
    """image width in pixels"""
    guidance_scale: float = 3.5
    """FLUX: the distilled guidance embedding (no CFG); SD3: the classifier-free guidance scale"""
    # --- sampling ---
    num_steps: int = 17
    """denoising steps per trajectory; the first num_steps-1 transitions are trainable, the last one is not"""
    shift: float = 3.0
    """resolution shift of the sigma schedule, s -> shift s / (1 + (shift - 1) s)"""
    sde_mode: Literal["flow", "dance", "cps"] = "flow"
    """the stochastic policy: flow (Flow-GRPO, GCPO), dance (DanceGRPO), cps (Flow-GRPO's CPS sampler)"""
    eta: float = 0.7
    """noise level of the SDE (flow 0.7, dance 0.3)"""
    prompts_per_rank: int = 2
    """B: prompts per rank per iteration; each prompt's whole group stays on its rank"""
    num_generations: int = 12
    """G: images per prompt (the group size)"""
    init_same_noise: Literal["none", "group", "all"] = "all"
    """initial noise shared by a prompt's group or by every trajectory of a rank (GCPO: all)"""
    rollout_batch_size: int = 12
    """trajectories per transformer forward during sampling (memory only; results do not depend on it)"""
    # --- objective ---
    timestep_fraction: float = 0.5
    """fraction of each trajectory's trainable steps that are trained per iteration (GCPO 0.5, DanceGRPO 0.6)"""
    clip_range: float = 5e-5
    """PPO clip epsilon; tiny because log-probs are per-element means (see sampler.sde_step)"""
    adv_clip_max: float = 5.0
    """advantages are clipped to [-adv_clip_max, adv_clip_max]"""
    adv_std: Literal["group", "batch"] = "group"
    """normalise by each prompt's reward std (DanceGRPO, GCPO) or one std over the whole batch (Flow-GRPO)"""
    slas_gamma: float | None = None
    """if set, SLAS: A = sign(d)|d|^(1+gamma), d = r - group mean, normalised by the batch std (0.5 is our guess)"""
    beta: float = 0.0
    """weight of the KL to the frozen base model (Flow-GRPO 0.04; DanceGRPO and GCPO use none)"""
    train_batch_size: int = 1
    """transitions per forward/backward during training (memory only; the gradient does not depend on it)"""
    # --- optimisation ---
    learning_rate: float = 1e-5
    """AdamW learning rate"""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas"""
    weight_decay: float = 1e-4
    """AdamW weight decay"""
    max_grad_norm: float = 0.01
    """gradient clipping threshold (GCPO / DanceGRPO: 0.01)"""
    gradient_accumulation_steps: int = 12
    """trajectories per optimizer step on each rank (GCPO: 12, so 2 optimizer steps per iteration)"""
    num_iterations: int = 150
    """sample-then-train iterations"""
    # --- system ---
    seed: int = 0
    """base seed: weights are the same on every rank; noise and prompts get a per-rank, per-iteration offset"""
    device: str = "auto"
    """cuda, cpu or auto"""
    gradient_checkpointing: bool = True
    """recompute transformer activations in backward (needed for FLUX at 720 px)"""
    output_dir: str = "runs/grpo"
    """where metrics.jsonl, sample grids and checkpoints go"""
    checkpoint_every: int = 50
    """save a checkpoint every k iterations (and at the end)"""
    image_every: int = 10
    """save a grid of samples with prompts and rewards every k iterations"""
    resume: bool = False
    """continue from the newest checkpoint in output_dir"""
    wandb: bool = False
    """also log to Weights & Biases (pip install wandb)"""


PRESETS = {
    # The toy world: 64 trajectories per iteration, ~5 s each on one CPU core. Over 100 iterations lr 3e-5 gained
    # reward on 3 of 3 seeds; 1e-4 lost it on 6 of 6 runs, 1e-3 collapses within 20 iterations (README, Results).
    "toy": dict(model="toy", prompts="toy", reward=("toy",), height=32, width=32, prompts_per_rank=8,
                num_generations=8, rollout_batch_size=64, train_batch_size=16, clip_range=1e-3, learning_rate=3e-5,
                max_grad_norm=1.0, gradient_accumulation_steps=32, num_iterations=100, gradient_checkpointing=False,
                output_dir="runs/toy-grpo", checkpoint_every=20, image_every=10, device="cpu"),
    "sd35": dict(model="stabilityai/stable-diffusion-3.5-medium", prompts="pickscore_train.txt", reward=("pickscore",),
                 height=512, width=512, guidance_scale=4.5, num_steps=10, shift=3.0, num_generations=24,
                 prompts_per_rank=1, init_same_noise="none", rollout_batch_size=8, timestep_fraction=0.99,
                 clip_range=1e-4, adv_std="batch", beta=0.04, learning_rate=1e-5, max_grad_norm=1.0,
                 gradient_accumulation_steps=12, output_dir="runs/sd35-grpo"),
}


# ----------------------------------------------------------------------------- advantages
def global_mean_std(x):
    """Mean and unbiased std of x over every rank's elements (batch-level statistics must not depend on sharding)."""
    stats = torch.stack([x.sum(), (x * x).sum(), torch.tensor(float(x.numel()), device=x.device)]).double()
    if dist.is_initialized():
        dist.all_reduce(stats)
    total, squares, n = stats
    mean = total / n
    return mean.float(), ((squares - n * mean**2).clamp(min=0) / (n - 1).clamp(min=1)).sqrt().float()


def compute_advantages(rewards, group, *, adv_std="group", slas_gamma=None, adv_clip_max=5.0):
    """Group-relative advantages (N,), and the fraction of groups whose rewards are all equal (they get A = 0)."""
    num_groups = int(group.max()) + 1
    count = torch.bincount(group, minlength=num_groups).float()  # (B,)
    mean = torch.zeros(num_groups, device=rewards.device).index_add_(0, group, rewards) / count  # (B,)
    d = rewards - mean[group]  # (N,) r_i - mean_group(r)
    var = torch.zeros(num_groups, device=rewards.device).index_add_(0, group, d * d) / (count - 1)  # unbiased
    zero_std = var.sqrt() < 1e-6  # (B,) nothing to learn from a group whose images all scored the same
    if slas_gamma is not None:
        shaped = d.sign() * d.abs() ** (1 + slas_gamma)  # SLAS: A = sign(d)|d|^(1+gamma), no per-prompt std
        adv = shaped / (global_mean_std(shaped)[1] + 1e-8)  # normalised by the std over all ranks' batch
    elif adv_std == "batch":
        adv = d / (global_mean_std(rewards)[1] + 1e-8)  # Flow-GRPO: group mean, one std for the whole batch
    else:
        adv = d / (var.sqrt()[group] + 1e-8)  # DanceGRPO / GCPO: A_i = (r_i - mean_g) / (std_g + 1e-8)
    adv = torch.where(zero_std[group], torch.zeros_like(adv), adv)
    return adv.clamp(-adv_clip_max, adv_clip_max), zero_std.float().mean().item()


# ----------------------------------------------------------------------------- the step-level objective
def ppo_clip_loss(ratio, adv, clip_range):
    """max(-A r, -A clip(r, 1 - eps, 1 + eps)) elementwise: the pessimistic PPO surrogate, negated."""
    return torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_range, 1 + clip_range))


@dataclass
class Learner:
    """What an objective needs: the policy (model.transformer, sharded under torchrun), the frozen reference, args."""
    model: object
    ref: torch.nn.Module | None
    args: Args

    def log_probs(self, traj, rows, steps):
        """log pi_theta of stored transitions (rows[m], steps[m]) as one batch, each row with its own sigma: (M,) x 2.

        The same sde_step that sampled them scores them, so unchanged weights give ratio == 1 exactly.
        """
        a, m = self.args, self.model
        x, x_next = traj.latents[rows, steps], traj.latents[rows, steps + 1]  # (M, ...)
        s, s_next = traj.sigmas[steps], traj.sigmas[steps + 1]  # (M,)
        embeds = {k: e[rows] for k, e in traj.embeds.items()}
        kw = dict(mode=a.sde_mode, eta=a.eta, sigma_max=traj.sigmas[1])
        with autocast(m.device):
            v = m.velocity(m.transformer, x, s, embeds)
        _, logp = sde_step(v, x, s, s_next, prev_sample=x_next, **kw)
        if self.ref is None:
            return logp, torch.zeros_like(logp)
        with torch.no_grad(), autocast(m.device):
            v_ref = m.velocity(self.ref, x, s, embeds)
        mean, std = sde_mean_std(v, x, s, s_next, **kw)
        mean_ref, _ = sde_mean_std(v_ref, x, s, s_next, **kw)
        kl = ((mean - mean_ref) ** 2 / (2 * std**2)).mean(tuple(range(1, x.ndim)))  # Flow-GRPO's KL, per element
        return logp, kl


def units_per_trajectory(num_units, fraction):
    return max(1, int(num_units * fraction))


def step_loss(learner, traj, adv, rows, steps, scale):
    """Forward + backward the step-level loss of trajectories `rows` (n,) at their selected `steps` (n, k).

    Each transition's loss is scaled by `scale / k` (scale = 1 / trajectories per optimizer step), so the gradient is
    the mean over trajectories of the mean over their trained steps, however the transitions are split into forwards.
    """
    k = steps.shape[1]
    r, t = rows[:, None].expand_as(steps).flatten(), steps.flatten()  # (n*k,) transition coordinates
    ratios = []
    for b in range(0, len(r), learner.args.train_batch_size):
        rb, tb = r[b:b + learner.args.train_batch_size], t[b:b + learner.args.train_batch_size]
        logp, kl = learner.log_probs(traj, rb, tb)
        ratio = (logp - traj.log_probs[rb, tb]).exp()  # (m,) r_t = exp(logp_theta - logp_old)
        loss = ppo_clip_loss(ratio, adv[rb], learner.args.clip_range) + learner.args.beta * kl
        (loss.sum() * scale / k).backward()
        ratios.append(ratio.detach())
    return torch.cat(ratios)  # (n*k,)


def step_objective(learner, traj, adv, rows, scale, generator):
    """Step-level GRPO: a random `timestep_fraction` of each trajectory's T trainable steps, each its own unit."""
    T = traj.log_probs.shape[1]
    k = units_per_trajectory(T, learner.args.timestep_fraction)
    steps = torch.stack([torch.randperm(T, generator=generator)[:k] for _ in rows]).to(rows.device)  # (n, k)
    return step_loss(learner, traj, adv, rows, steps, scale), {}


def main(args: Args, objective=step_objective, describe=lambda args, T: []):
    """The GRPO loop. `objective(learner, traj, adv, rows, scale, generator) -> (unit ratios, extra counts)` does the
    forward/backward of one optimizer step's trajectories; train_chunk.py passes its chunk-level one."""
    from rewards import build_reward
    device, rank, world = setup_distributed(args)
    master = rank == 0
    print0 = print if master else lambda *a, **k: None
    n_local, T = args.prompts_per_rank * args.num_generations, args.num_steps - 1
    if args.num_generations < 2:
        raise UsageError("--num-generations 1: group-relative advantages need at least 2 images per prompt")
    if n_local % args.gradient_accumulation_steps:
        raise UsageError(f"--prompts-per-rank x --num-generations = {n_local} trajectories per rank is not divisible "
                         f"by --gradient-accumulation-steps {args.gradient_accumulation_steps}; change one of them")
    prompts = PromptSource(args.prompts)
    half = torch.bfloat16 if device.type == "cuda" else torch.float32  # inference-only parts run in bf16 on CUDA
    reward_fn = build_reward(list(args.reward), device=device, dtype=half, paths=list(args.reward_path))
    torch.manual_seed(args.seed)  # identical weights on every rank (also true of a loaded checkpoint)
    model = load_model(args.model, device=device, dtype=half, height=args.height, width=args.width,
                       guidance_scale=args.guidance_scale)
    policy = model.transformer.float().requires_grad_(True)  # fp32 master weights; compute runs in bf16 on CUDA
    if args.gradient_checkpointing:
        policy.enable_gradient_checkpointing()
    ref = deepcopy(policy).requires_grad_(False).eval() if args.beta > 0 else None
    if dist.is_initialized():
        for m in (policy, ref):
            if m is not None:
                shard(m, device)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, betas=args.adam_betas,
                                  weight_decay=args.weight_decay)
    learner = Learner(model, ref, args)
    start = load_checkpoint(policy, optimizer, checkpoints(args.output_dir)[-1], rank) \
        if args.resume and checkpoints(args.output_dir) else 0
    logger = Logger(args if master else None, start)
    opt_steps = n_local // args.gradient_accumulation_steps
    print0("\n".join([f"trajectories per iteration: {world} ranks x {args.prompts_per_rank} prompts x "
                      f"{args.num_generations} images = {world * n_local}",
                      f"optimizer steps per iteration: {opt_steps} (of {args.gradient_accumulation_steps} "
                      f"trajectories per rank each)", f"trainable steps per trajectory: T = {T}",
                      *describe(args, T), f"starting at iteration {start} of {args.num_iterations}"]))

    for it in tqdm(range(start, args.num_iterations), desc="iterations", disable=not master, initial=start,
                   total=args.num_iterations):
        t0 = time.perf_counter()
        # Prompts: one global draw per iteration, sliced per rank, so ranks never share a prompt; every prompt's
        # whole group is sampled on its rank, so group statistics need no communication.
        batch = prompts.draw(world * args.prompts_per_rank, seed_for(args.seed, it))
        batch = batch[rank * args.prompts_per_rank:(rank + 1) * args.prompts_per_rank]
        policy.eval()
        with autocast(device):  # noise gets a per-rank, per-iteration seed: ranks explore different trajectories
            traj = rollout(model, batch, num_generations=args.num_generations, num_steps=args.num_steps,
                           shift=args.shift, mode=args.sde_mode, eta=args.eta, seed=seed_for(args.seed, it, rank),
                           init_same_noise=args.init_same_noise, batch_size=args.rollout_batch_size,
                           progress=master)
        t1 = time.perf_counter()
        with torch.no_grad():
            rewards, components = reward_fn(traj.images, traj.prompts)  # (N,), {name: (N,)}
        rewards = rewards.to(device).float()
        adv, frac_zero = compute_advantages(rewards, traj.group, adv_std=args.adv_std, slas_gamma=args.slas_gamma,
                                            adv_clip_max=args.adv_clip_max)
        t2 = time.perf_counter()

        policy.train()
        gen = torch.Generator().manual_seed(seed_for(args.seed, it, rank, 1))  # which trajectories/steps to train
        order = torch.randperm(n_local, generator=gen).to(device)
        ratios, extras, norms, first = [], {}, [], None
        for rows in order.split(args.gradient_accumulation_steps):
            r, extra = objective(learner, traj, adv, rows, 1.0 / len(rows), gen)
            first = (r - 1).abs().max().item() if first is None else first  # before any update: must be ~0
            norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
            norms.append(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            ratios.append(r)
            for k, v in extra.items():
                extras[k] = extras.get(k, 0) + v
        t3 = time.perf_counter()

        ratio = gather(torch.cat(ratios).float())
        all_rewards = gather(rewards)
        log_ratio = ratio.log()
        metrics = {"iteration": it + 1, "reward": all_rewards.mean().item(), "reward_std": all_rewards.std().item(),
                   **{f"reward/{k}": gather(v.to(device).float()).mean().item() for k, v in components.items()},
                   "ratio": ratio.mean().item(), "ratio_min": ratio.min().item(), "ratio_max": ratio.max().item(),
                   "clip_frac": ((ratio - 1).abs() > args.clip_range).float().mean().item(),
                   "approx_kl": 0.5 * (log_ratio**2).mean().item(), "lr": optimizer.param_groups[0]["lr"]}
        metrics |= reduce_mean({"frac_reward_zero_std": frac_zero, "grad_norm": torch.stack(norms).mean().item(),
                                "time/rollout": t1 - t0, "time/reward": t2 - t1, "time/train": t3 - t2,
                                "time/iteration": t3 - t0}, device)
        metrics["ratio_first"] = gather(torch.tensor([first], device=device)).max().item()
        metrics["num_trajectories"] = len(all_rewards)
        if world > 1:  # every rank must hold the same weights after the update: a cheap digest, compared
            digest = sum((p.full_tensor() if hasattr(p, "full_tensor") else p).detach().double().square().sum()
                         for p in policy.parameters()).view(1)
            metrics["weight_sync_err"] = (gather(digest) - digest).abs().max().item()
        metrics |= {k: v * world for k, v in reduce_mean(extras, device).items()}  # counts: summed over ranks
        logger.log(metrics)
        tqdm.write(f"it {it + 1}: reward {metrics['reward']:.4f} ratio_first {metrics['ratio_first']:.1e} "
                   f"clip_frac {metrics['clip_frac']:.3f} ({metrics['time/iteration']:.1f}s)") if master else None
        if master and args.image_every and (it + 1) % args.image_every == 0:
            k = min(len(traj.prompts), 16)
            path = Path(args.output_dir, "samples", f"iter_{it + 1:05d}.png")
            path.parent.mkdir(parents=True, exist_ok=True)
            image_grid(traj.images[:k], [f"{rewards[i]:.2f} {traj.prompts[i]}" for i in range(k)],
                       cols=args.num_generations, scale=4 if model.kind == "toy" else 1).save(path)
        if (it + 1) % args.checkpoint_every == 0 or it + 1 == args.num_iterations:
            save_checkpoint(policy, optimizer, args, it + 1, rank)
    if dist.is_initialized():
        dist.destroy_process_group()


def parse_args(argv=None):
    return preset_cli(Args, PRESETS, argv)


if __name__ == "__main__":
    run(main, parse_args)
