"""
Learning curves of finished toy runs: each run's training reward per iteration (its metrics.jsonl) and its
held-out reward at every saved checkpoint (one eval.py call over all of them, the same prompts and noise for
every model, paired with the base), one line per objective with a +-1 std band over its seeds.

    python -m scripts.learning_curves --runs step=runs/f24/step-s0 step=runs/f24/step-s1 \
        chunk-weighted=runs/f24/chunkw-s0 chunk-weighted=runs/f24/chunkw-s1 --out assets/toy_curves.png

A run is `NAME=FOLDER` (a trainer's --output-dir); runs of one NAME are its seeds. Writes the figure (with
matplotlib), FIGURE.json beside it (every point, so a figure can be redrawn without evaluating again) and
the evaluation's folder.
"""

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import tyro

from plumbing.checkpoints import checkpoints
from plumbing.metrics import read_metrics
from plumbing.tables_and_figures import plot_seed_curves

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Args:
    runs: tuple[str, ...]
    """`NAME=FOLDER` per run; a NAME given several times is one objective's seeds"""
    num_prompts: int = 200
    """held-out prompts per checkpoint (one image each, ODE)"""
    out: str = "assets/toy_curves.png"
    """the figure; its points go to the same path with .json"""
    eval_dir: str = "runs/learning_curves"
    """eval.py's output folder"""


def main(args: Args):
    runs = [spec.split("=", 1) for spec in args.runs]
    if any(len(r) != 2 for r in runs):
        sys.exit("error: give each run as NAME=FOLDER")
    labels = {}  # eval label -> (name, run index, iteration, checkpoint)
    for i, (name, folder) in enumerate(runs):
        for ckpt in checkpoints(folder):
            it = int(ckpt.name.split("_")[1])  # iter_XXXXX
            labels[f"{name}-{i}-{it}"] = (name, i, it, ckpt)
    if not labels:
        sys.exit("error: no checkpoints in the runs given")
    cmd = [sys.executable, "eval.py", "--preset", "toy", "--num-prompts", str(args.num_prompts)]
    cmd += ["--output-dir", args.eval_dir, "--checkpoints", *(f"{k}={v[3]}" for k, v in labels.items())]
    subprocess.run(cmd, cwd=ROOT, env=os.environ | {"OMP_NUM_THREADS": "2"}, check=True)
    rows = json.loads(Path(args.eval_dir, "results.json").read_text())["rows"]
    held = {row["label"]: row["mean"]["toy"] for row in rows}  # the verifier's mean reward
    base = rows[0]["mean"]["toy"]  # the first row is the base model
    configs = {}
    for i, (name, folder) in enumerate(runs):
        metrics = read_metrics(Path(folder, "metrics.jsonl"))
        train = [json.loads(line)["reward"] for _, line in metrics]
        configs.setdefault(name, {"seeds": {}})["seeds"][str(i)] = {
            "curve": {},
            "curve_base": base,
            "train": train,
        }
    for label, (name, i, it, _) in labels.items():
        configs[name]["seeds"][str(i)]["curve"][str(it)] = held[label]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).with_suffix(".json").write_text(json.dumps(configs, indent=1) + "\n")
    plot_seed_curves(Path(args.out), configs, list(configs))
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.json')}")


if __name__ == "__main__":
    main(tyro.cli(Args))
