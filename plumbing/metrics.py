"""
A training run's metrics: one row per iteration, computed over every rank's trajectories, and metrics.jsonl,
the run's log of them, appended by rank 0 (and mirrored to wandb with --wandb). A resumed run keeps the rows
up to the iteration it resumes from and redoes the rest; a partial last line (the run was killed mid-write) is
dropped with a warning. Also the guard that skips an optimizer step whose gradient is not finite. Of the
project it imports only plumbing/runtime.py and plumbing/checkpoints.py (to name the last good checkpoint).
"""

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from plumbing.checkpoints import checkpoints
from plumbing.runtime import UsageError, gather, reduce_mean


def ratio_metrics(ratio, clip_range):
    """Statistics of the importance ratios (M,) of every trained unit (step or chunk) of an iteration."""
    return {
        "ratio": ratio.mean().item(),
        "ratio_min": ratio.min().item(),
        "ratio_max": ratio.max().item(),
        "clip_frac": ((ratio - 1).abs() > clip_range).float().mean().item(),
        "approx_kl": 0.5 * ratio.log().square().mean().item(),  # 0.5 E[(log r)^2], how far the policy moved
    }


def iteration_metrics(iteration, rewards, components, ratios, clip_range, shared, means, counts) -> dict:
    """One row of metrics.jsonl; every rank calls it (it gathers). `rewards` (N,) and `components`
    {name: (N,)} of this rank's trajectories (only finite values are averaged), `ratios` the list of each
    optimizer step's unit ratios, `shared` values equal on every rank, `means` averaged over ranks, `counts`
    summed over them.
    ratio_first: max |ratio - 1| of each rank's first optimizer step, scored before any update: must be ~0."""
    device = rewards.device
    all_rewards = gather(rewards)  # (world * N,)
    finite = all_rewards[torch.isfinite(all_rewards)]
    metrics = {"iteration": iteration, "reward": finite.mean().item(), "reward_std": finite.std().item()}
    metrics["reward_nonfinite"] = len(all_rewards) - len(finite)
    for name, values in components.items():
        part = gather(values.to(device).float())
        metrics[f"reward/{name}"] = part[torch.isfinite(part)].mean().item()
    metrics |= ratio_metrics(gather(torch.cat(ratios).float()), clip_range)
    metrics["ratio_first"] = gather((ratios[0] - 1).abs().max().view(1)).max().item()
    metrics |= shared | reduce_mean(means, device)
    metrics["num_trajectories"] = len(all_rewards)
    world = dist.get_world_size() if dist.is_initialized() else 1
    for name, mean in reduce_mean(counts, device).items():  # a sum over ranks: the mean times world
        metrics[name] = mean * world
    return metrics


def row_iteration(line: str):
    """The iteration of a line of metrics.jsonl, or None if the line is not a metrics row."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row.get("iteration") if isinstance(row, dict) else None


def read_metrics(path: Path) -> list[tuple[int, str]]:
    """(iteration, line) of each row of a metrics.jsonl. A partial last line (the run was killed mid-write) is
    dropped with a warning; any other line that is not a metrics row is refused."""
    lines = [
        (n, line) for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if line.strip()
    ]
    rows = [(row_iteration(line), line) for _, line in lines]
    bad = [i for i, (it, _) in enumerate(rows) if not isinstance(it, int)]
    if bad and bad[0] < len(rows) - 1:
        raise UsageError(
            f"{path} line {lines[bad[0]][0]} is not a metrics row; delete it, then --resume again"
        )
    if bad:
        print(f"warning: dropped the partial last line of {path}", file=sys.stderr)
    return rows[: len(rows) - len(bad)]


class Logger:
    """metrics.jsonl (+ wandb) on rank 0; every other rank gets `Logger(None)`, which does nothing."""

    def __init__(self, args, start):
        self.path = None if args is None else Path(args.output_dir, "metrics.jsonl")
        self.run = None
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = read_metrics(self.path) if self.path.exists() else []
        kept = [line for it, line in rows if it <= start]  # a resumed run redoes the rest
        tmp = self.path.with_name(self.path.name + ".tmp")  # same folder: os.replace is then atomic
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)
        if args.wandb:
            try:
                import wandb
            except ImportError:
                raise UsageError("--wandb needs the wandb package: pip install wandb") from None
            self.run = wandb.init(project="chunk-grpo", config=asdict(args))

    def log(self, metrics):
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(metrics) + "\n")
        if self.run is not None:
            self.run.log(metrics, step=metrics["iteration"])


class NonFiniteGuard:
    """Optimizer steps with a non-finite loss or gradient norm are skipped (the weights stay as they were);
    --max-skipped-steps of them in a row stop the run, naming the last good checkpoint."""

    def __init__(self, args):
        self.limit, self.output_dir, self.in_a_row = args.max_skipped_steps, args.output_dir, 0

    def skip(self, norm, iteration: int) -> bool:
        if torch.isfinite(norm):
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            last = checkpoints(self.output_dir)
            raise UsageError(
                f"iteration {iteration}: {self.in_a_row} optimizer steps in a row had a non-finite loss or "
                f"gradient norm; stopped. Last good checkpoint: {last[-1] if last else 'none'}"
            )
        return True
