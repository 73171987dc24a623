"""
metrics.jsonl, a run's log: one JSON object per iteration, appended by rank 0 (and mirrored to wandb with
--wandb). A resumed run keeps the rows up to the iteration it resumes from and redoes the rest; a partial last
line (the run was killed mid-write) is dropped with a warning. Of the project it imports only
plumbing/runtime.py.
"""

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from plumbing.runtime import UsageError


def metrics_iteration(line: str):
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
    rows = [(metrics_iteration(line), line) for _, line in lines]
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
