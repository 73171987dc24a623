"""
Is a GRPO batch big enough to learn from? The policy gradient's signal-to-noise ratio on the toy world,
measured: K independent batches of rollouts from one policy (B prompts x G images each, as an iteration of the
toy preset samples them), each batch's gradient of the step-level GRPO loss at every denoising step, and the
cosine between the gradients of different batches.

    python -m scripts.gradient_snr                          # the toy preset's batch, 6 batches: ~4 min
    python -m scripts.gradient_snr --eta 1.2 --fixed-prompts
    python -m scripts.gradient_snr --objective awm             # AWM's loss on the same rollouts

`--objective awm` measures the likelihood-free estimator (train_awm.py) on the same batches: each step's
gradient is AWM's loss at that step's sigma, every trajectory's clean sample re-noised once.

For unbiased estimates g_i = mu + n_i of one gradient mu from N trajectories each,
E cos(g_i, g_j) ~ |mu|^2 / (|mu|^2 + tr(Sigma) / N): a mean cosine near 0 means a batch's gradient is noise,
and N (1 - c) / c estimates the batch size at which the cosine would reach 1/2 (half signal).
"""

import itertools
import time
from dataclasses import dataclass
from typing import Literal

import torch
import tyro

from plumbing import toy
from plumbing.models import load_model
from rewards import build_reward
from sampler import mode_defaults, rollout, sampling_settings
from train_awm import AWMArgs, awm_loss
from train_grpo import Learner, compute_advantages, step_loss


@dataclass
class Args:
    batches: int = 6
    """K independent batches (K (K - 1) / 2 pairs of cosines)"""
    prompts_per_batch: int = 8
    """B training prompts a batch (the toy preset: 8)"""
    num_generations: int = 16
    """G images a prompt (the toy preset: 8; 16 halves the noise of the measurement)"""
    fixed_prompts: bool = False
    """the same B prompts in every batch (the noise of the images only), instead of fresh prompts"""
    num_steps: int = 17
    """denoising steps (the toy preset: 17, shift 3)"""
    sde_mode: str = "flow"
    """the sampler's SDE (flow, dance, cps)"""
    eta: float = 0.7
    """its noise level (the toy preset: flow, 0.7)"""
    init_same_noise: str = "all"
    """none, group or all (the toy preset: all)"""
    objective: Literal["step", "awm"] = "step"
    """the estimator: step-level GRPO's likelihood-ratio gradient, or AWM's weighted flow matching"""
    shuffle_rewards: bool = False
    """permute the rewards within each prompt's group (a control: what cosine the estimator shows with no
    signal in its advantages; an unbiased one shows ~0)"""
    model: str = "toy"
    """the toy bundle (`toy` or a folder)"""
    seed: int = 0
    threads: int = 2
    """CPU threads"""


def cosines(grads):
    """Mean cosine over the pairs of (P,) gradients."""
    pairs = itertools.combinations(grads, 2)
    return sum(torch.nn.functional.cosine_similarity(a, b, dim=0).item() for a, b in pairs) / (
        len(grads) * (len(grads) - 1) / 2
    )


def shuffle_within_groups(rewards, group, generator):
    """`rewards` (N,) permuted among the rows of each group (`group` (N,) ascending, as rollouts order them):
    every group keeps its rewards, in an order that says nothing about its images."""
    order = torch.randperm(len(rewards), generator=generator)
    return rewards[order[torch.argsort(group[order], stable=True)]]


def jackknife_se(grads):
    """Standard error of `cosines(grads)` by leaving out one batch at a time (pairs share batches, so the
    spread of the pairs' cosines would understate it)."""
    k = len(grads)
    if k < 3:
        return float("nan")  # leaving one of two out leaves no pair
    left_out = torch.tensor([cosines(grads[:i] + grads[i + 1 :]) for i in range(k)])  # (K,)
    return ((k - 1) / k * (left_out - left_out.mean()).square().sum()).sqrt().item()


def main(args: Args):
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    reward_fn = build_reward(["toy"])
    train = mode_defaults(
        AWMArgs(
            num_steps=args.num_steps,
            sde_mode=args.sde_mode,
            eta=args.eta,
            clip_range=1e-3,
            train_batch_size=64,
        )
    )
    learner, sampling = Learner(model, None, train), sampling_settings(train, model)  # 17 steps, shift 3
    params = [p for p in model.transformer.parameters() if p.requires_grad]
    per_step, rewards = [], []  # K x (T, P) gradients, K mean rewards
    start = time.perf_counter()
    for k in range(args.batches):
        prompt_seed = args.seed if args.fixed_prompts else args.seed + 1000 * (k + 1)
        prompts = toy.sample_prompts("train", args.prompts_per_batch, prompt_seed)
        traj = rollout(
            model,
            prompts,
            num_generations=args.num_generations,
            seed=args.seed + k,
            init_same_noise=args.init_same_noise,
            batch_size=64,
            **sampling,
        )
        r, _ = reward_fn(traj.images, traj.prompts)
        if args.shuffle_rewards:
            r = shuffle_within_groups(r, traj.group, torch.Generator().manual_seed(k))
        adv, _ = compute_advantages(r.float(), traj.group)
        rows, T = torch.arange(len(adv)), traj.log_probs.shape[1]
        kept = torch.isfinite(r).float()  # (N,) the toy verifier's scores are always finite
        grads = []
        if args.objective == "awm":  # one re-noising of each clean sample, shared by the T steps' losses
            noise = torch.randn(
                (len(rows), *traj.clean.shape[1:]), generator=torch.Generator().manual_seed(k)
            )
        for t in range(T):  # each step's gradient on its own: one step, every trajectory, the mean over them
            model.transformer.zero_grad(set_to_none=True)
            steps = torch.full((len(rows), 1), t)
            if args.objective == "awm":
                awm_loss(learner, traj, adv, kept, rows, steps, noise, 1.0 / len(rows))
            else:
                step_loss(learner, traj, adv, kept, rows, steps, 1.0 / len(rows))
            grads.append(torch.cat([p.grad.flatten() for p in params]))
        per_step.append(torch.stack(grads))
        rewards.append(r.float().mean().item())
        print(f"batch {k + 1}/{args.batches}: reward {rewards[-1]:.3f}", flush=True)

    N = args.prompts_per_batch * args.num_generations
    seconds = (time.perf_counter() - start) / args.batches
    print(f"\n{args}\nmean reward {sum(rewards) / len(rewards):.3f}; {N} trajectories a batch")
    print(f"{seconds:.0f} s a batch (its rollout, rewards and T backward passes)\n")
    print("| step | sigma | gradient norm | mean cosine between batches |\n|---|---|---|---|")
    for t in range(T):
        norm = sum(g[t].norm().item() for g in per_step) / len(per_step)
        c = cosines([g[t] for g in per_step])
        print(f"| {t} | {traj.sigmas[t].item():.3f} | {norm:.2e} | {c:+.4f} |")
    totals = [g.sum(0) for g in per_step]
    c, se = cosines(totals), jackknife_se(totals)
    needed = f"~{N * (1 - c) / c:.0f} trajectories" if c > 0 else "not estimable (cosine <= 0)"
    print(f"\nall steps: mean cosine {c:+.4f} +- {se:.4f}; batch for a cosine of 1/2: {needed}")


if __name__ == "__main__":
    main(tyro.cli(Args))
