"""
Advantage Weighted Matching (AWM): a likelihood-free objective on the rollouts of train_grpo.py.

    python train_awm.py --preset toy                         # 1 CPU: the toy world, minutes
    python train_awm.py --preset sd35                        # 1 GPU: AWM's SD3.5-M PickScore recipe (LoRA)
    torchrun --nproc_per_node 8 train_awm.py --preset flux   # 8 GPUs: GCPO's FLUX.1-dev rollouts, AWM's LoRA

AWM (Xue et al. 2025, arXiv 2509.25050; code github scxue/advantage_weighted_matching) observes that
maximising the per-step Gaussian log-likelihood that GRPO ratios (sampler.sde_step) is, up to the
Euler-Maruyama error, denoising score matching conditioned on the *noisy* next state x_{t-dt}: the same
minimiser as matching the clean sample, with extra variance in its target. It drops the likelihood and trains
the pretraining loss itself, flow matching on the rollout's clean latent x0, freshly re-noised, each sample
weighted by its advantage:

    x_t  = (1 - t) x0_i + t eps,   eps ~ N(0, I) fresh, t from the sampler's own sigma grid
    d_it = mean over latent elements of (v_theta(x_t, t) - (eps - x0_i))^2
    loss = mean_{i,t} (A_i / adv_clip_max) t ((d_it + 1e-10)^p - 1e-10^p) / p + beta mean (v_theta - v_ref)^2

(scripts/train_sd3_awm.py: its `ghuber` weighting, p = 0.25; advantages clipped to 5 and scaled into [-1, 1]).
A > 0 pulls the velocity toward the trajectory's own clean sample, A < 0 pushes it away; with every advantage
0 the policy term vanishes. The timesteps are stratified over the rollout's T trainable sigmas: a trajectory
trains k = int(T timestep_fraction) of them, one drawn uniformly from each of k contiguous strata.

Kept from GRPO: the rollouts (the same flow SDE trajectories: AWM is indifferent to the sampler, so the
objectives compare on identical rollouts, though its own runs sample with an ODE or an SDE in mid-schedule),
the rewards, group-relative advantages clipped to --adv-clip-max, the KL to the frozen base (--beta, here on
the velocities at the re-noised points, as AWM computes it), the loop, LoRA, torchrun, resume. Dropped: the
importance ratio and its clip (AWM's code keeps a ratio that is 1 by construction on-policy; the `ratio`
metrics here are 1 and ratio_first 0), and log pi_old. Not implemented: AWM's second proximal term, a squared
distance to an EMA of recent policies (its "ema" adapter, decay ramped to 0.3), which would need a third copy
of the policy in every checkpoint. On the toy, AWM without it gains held-out reward and, later, paints a faint
texture (README, Results): that term is the first lever to try against it.
"""

from dataclasses import dataclass
from typing import Annotated

import torch

import train_grpo
from plumbing import recipes
from plumbing.runtime import Range, autocast, run
from sampler import num_selected
from train_grpo import Args


@dataclass
class AWMArgs(Args):
    # --- AWM ---
    awm_power: Annotated[float, Range("> 0")] = 0.25
    """p of AWM's `ghuber` weighting: each point's loss is t ((d + 1e-10)^p - 1e-10^p) / p of its squared
    error d (p = 1: plain flow matching weighted by t)"""


PRESETS = recipes.AWM  # toy, sd35, flux (plumbing/recipes.py); no preset: GCPO's recipe with AWM's loss


def stratified_steps(n: int, T: int, fraction: float, generator=None) -> torch.Tensor:
    """For each of n trajectories, k = num_selected(T, fraction) steps of 0..T-1, one drawn uniformly from
    each of k contiguous strata (AWM's `discrete` timestep sampling): (n, k) long, ascending."""
    k = num_selected(T, fraction)
    bounds = torch.linspace(0, T, k + 1).long()  # (k+1,) strata [bounds[j], bounds[j+1])
    width = (bounds[1:] - bounds[:-1]).float()  # (k,)
    offset = (torch.rand(n, k, generator=generator) * width).long()  # (n, k) uniform within each stratum
    return bounds[:-1] + offset


def awm_loss(learner, traj, adv, kept, rows, steps, noise, scale):
    """Forward + backward AWM's loss of trajectories `rows` (n,) at the sigmas of `steps` (n, k), each point
    re-noised with its own `noise` (n*k, *latent_shape). Scaled like train_grpo.step_loss: the gradient is the
    mean over trajectories of the mean over their points, however the points are batched. Returns the
    (n*k,) squared errors d."""
    a, m, k = learner.args, learner.model, steps.shape[1]
    r, t = rows[:, None].expand_as(steps).flatten(), steps.flatten()  # (n*k,) each point's trajectory, step
    errors = []
    for b in range(0, len(r), a.train_batch_size):
        rb, sigma = r[b : b + a.train_batch_size], traj.sigmas[t[b : b + a.train_batch_size]]  # (M,)
        x0, eps = traj.clean[rb], noise[b : b + a.train_batch_size].to(traj.clean.device)  # (M, ...)
        s = sigma.reshape(-1, *[1] * (x0.ndim - 1))  # (M, 1, ...)
        x_t = (1 - s) * x0 + s * eps  # the forward process at sigma t, from the clean sample
        embeds = {name: e[rb] for name, e in traj.embeds.items()}
        with autocast(m.device):
            v = m.velocity(m.transformer, x_t, sigma, embeds).float()  # (M, ...)
        dims = tuple(range(1, v.ndim))
        d = ((v - (eps - x0)) ** 2).mean(dims)  # (M,) flow matching's error: v ~ eps - x0
        p = a.awm_power
        weighted = sigma * ((d + 1e-10) ** p - 1e-10**p) / p  # (M,) AWM's ghuber weighting, times t
        loss = adv[rb] / a.adv_clip_max * weighted  # A in [-1, 1]
        if learner.ref is not None:
            with torch.no_grad(), autocast(m.device):
                v_ref = m.velocity(learner.ref, x_t, sigma, embeds).float()
            loss = loss + a.beta * ((v - v_ref) ** 2).mean(dims)
        ((loss * kept[rb]).sum() * scale / k).backward()
        errors.append(d.detach())
    return torch.cat(errors)  # (n*k,)


def awm_objective(learner, traj, adv, kept, rows, scale, generator):
    """AWM on one optimizer step's trajectories: stratified steps, fresh noise, awm_loss. AWM has no
    importance ratio: it reports ratios of 1 (one per trained point) to the loop's metrics."""
    T = traj.log_probs.shape[1]
    steps = stratified_steps(len(rows), T, learner.args.timestep_fraction, generator).to(rows.device)
    shape = (steps.numel(), *traj.clean.shape[1:])
    noise = torch.randn(shape, generator=generator)  # (n*k, ...) on the CPU: the same draws on any device
    errors = awm_loss(learner, traj, adv, kept, rows, steps, noise, scale)
    return torch.ones_like(errors), {}


def describe_awm(args: AWMArgs, T: int) -> list[str]:
    """AWM's lines of the derived totals."""
    k = num_selected(T, args.timestep_fraction)
    return [f"AWM: {k} of T = {T} sigmas per trajectory (stratified), ghuber p {args.awm_power:g}, no ratio"]


def main(args: AWMArgs):
    train_grpo.main(args, objective=awm_objective, describe=describe_awm)


if __name__ == "__main__":
    run(main, AWMArgs, PRESETS)
