"""
Does an update carry signal, or only drift? Each configuration trains twice from the toy bundle: once on the
verifier's reward, and once on a *shuffled twin* of it, the same scores permuted among each prompt's images
(every group keeps its rewards, so the advantages keep their distribution, but they no longer say anything
about the images). Both runs are then scored on held-out prompts against the base with the same noise:

    drift  = held-out delta of the shuffled run       (what the update's noise alone does to the model)
    signal = delta of the real run - delta of the shuffled run, paired on the same prompts and noise

    python -m scripts.signal_vs_drift                      # lr 1e-4: one pair and its evaluation, ~8 min
    python -m scripts.signal_vs_drift --configs="--learning-rate 1e-4 --beta 0.04" --seeds 0 1
    python -m scripts.signal_vs_drift --trainer train_chunk.py --configs="--chunk-weighted-sampling"

A configuration is a string of the trainer's flags over `--preset toy` (give it with `=`:
tyro reads a leading `--` as its own flag). Runs go two at a time (one CPU thread each) and are skipped when
their last checkpoint exists, so a stopped study resumes. Each line of the table: both deltas and the signal
with standard errors, and eval.py's drawing measures `fit` and `faint` of both runs (which the verifier
does not read). A reward that learns shows a real delta above zero with fit and faint no worse than the
base's; NOTES.md has the table this made on the toy bundle (real runs above their twins, none above the base).
"""

import json
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Args:
    configs: tuple[str, ...] = ("--learning-rate 1e-4",)
    """trainer flags over --preset toy, one string per configuration"""
    trainer: Literal["train_grpo.py", "train_chunk.py", "train_awm.py"] = "train_grpo.py"
    """the objective: step-level GRPO, chunk-level GRPO or AWM"""
    num_iterations: int = 30
    """iterations per run (the preset's 64 trajectories each)"""
    seeds: tuple[int, ...] = (0,)
    """training seeds per arm; with two or more, standard errors are over seeds (a run's drift is a random
    walk of its own: two runs of one setting differ by more than the prompts' standard error)"""
    num_prompts: int = 500
    """held-out prompts (one image each, ODE, the same noise for every model)"""
    output_dir: str = "runs/signal_vs_drift"
    jobs: int = 2
    """runs at a time, one CPU thread each"""


def shuffled_toy_reward(path=None, *, device="cpu", dtype=None):
    """The toy verifier's scores permuted within each prompt's images: a reward with no relation to them."""
    from rewards import toy_verifier

    verifier, calls = toy_verifier(), [0]

    def fn(images, prompts):
        score = verifier(images, prompts)  # (N,)
        gen = torch.Generator().manual_seed(1_000_003 + calls[0])
        calls[0] += 1
        groups = {}
        for i, p in enumerate(prompts):
            groups.setdefault(p, []).append(i)
        out = score.clone()
        for idx in map(torch.tensor, groups.values()):
            out[idx] = score[idx[torch.randperm(len(idx), generator=gen)]]
        return out

    return fn


def train(argv):
    """Run a trainer in this process with the shuffled reward registered: `train TRAINER FLAGS...`."""
    torch.set_num_threads(1)
    import rewards
    import train_awm
    import train_chunk
    import train_grpo
    from plumbing.runtime import run

    rewards.REWARDS["toy_shuffled"] = shuffled_toy_reward
    trainers = {
        "train_grpo.py": (train_grpo.main, train_grpo.Args, train_grpo.PRESETS),
        "train_chunk.py": (train_chunk.main, train_chunk.ChunkArgs, train_chunk.PRESETS),
        "train_awm.py": (train_awm.main, train_awm.AWMArgs, train_awm.PRESETS),
    }
    trainer, flags = argv[0], argv[1:]
    run(*trainers[trainer], flags)


def job(args, name, config, reward, seed):
    out = Path(args.output_dir) / name
    last = out / "checkpoints" / f"iter_{args.num_iterations:05d}"
    if last.is_dir():
        return last
    flags = ["--preset", "toy", *shlex.split(config), "--reward", reward, "--seed", str(seed)]
    flags += ["--num-iterations", str(args.num_iterations), "--checkpoint-every", str(args.num_iterations)]
    flags += ["--image-every", str(10**6), "--output-dir", str(out)]
    if out.exists():
        flags.append("--resume")
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    log = Path(args.output_dir) / f"{name}.log"
    cmd = [sys.executable, "-m", "scripts.signal_vs_drift", "train", args.trainer, *flags]
    with open(log, "w") as f:
        subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, check=True)
    return last


def scores(results, label, name="toy"):
    """(P,) held-out scores of one model, in prompt order: the verifier's, or eval.py's `fit` or `faint`."""
    rows = [r for r in results["images"] if r["model"] == label]
    return torch.tensor([r["scores"][name] for r in sorted(rows, key=lambda r: r["prompt_index"])])


def paired(a, b):
    """Mean and standard error of a - b over seeds (S, P) and prompts: over the seeds' means when S >= 2."""
    d = a - b  # (S, P)
    if len(d) == 1:
        return d.mean().item(), (d.std() / d.shape[1] ** 0.5).item()
    per_seed = d.mean(1)  # (S,)
    return per_seed.mean().item(), (per_seed.std() / len(per_seed) ** 0.5).item()


def main(args: Args):
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    names = {c: c.replace("--", "").replace(" ", "_").replace(".", "p") or "preset" for c in args.configs}
    arms = (("real", "toy"), ("shuffled", "toy_shuffled"))
    tasks = [(f"{names[c]}-{kind}-s{seed}", c, reward, seed) for seed in args.seeds for c in args.configs
             for kind, reward in arms]  # fmt: skip
    with ThreadPoolExecutor(args.jobs) as pool:
        done = dict(zip([t[0] for t in tasks], pool.map(lambda t: job(args, *t), tasks), strict=True))
    evaluated = Path(args.output_dir) / "eval"
    cmd = [sys.executable, "eval.py", "--preset", "toy", "--num-prompts", str(args.num_prompts)]
    cmd += ["--output-dir", str(evaluated), "--checkpoints", *(f"{k}={v}" for k, v in done.items())]
    subprocess.run(cmd, cwd=ROOT, env=os.environ | {"OMP_NUM_THREADS": "2"}, check=True)
    results = json.loads((evaluated / "results.json").read_text())
    label = results["rows"][0]["label"]
    base = {name: scores(results, label, name)[None] for name in ("toy", "fit", "faint")}  # (1, P) each
    over = "seeds" if len(args.seeds) > 1 else "prompts (one seed: a run's own randomness is not in it)"
    caption = f"{args.trainer}, {args.num_iterations} iterations, seeds {list(args.seeds)}, "
    caption += f"{args.num_prompts} held-out prompts (base {base['toy'].mean():.3f}, fit "
    caption += f"{base['fit'].mean():.2f}, faint {base['faint'].mean():.3f}); mean +- SE over {over}; "
    caption += "fit and faint (eval.py): real run / shuffled run"
    head = "| flags over --preset toy | real delta | drift (shuffled delta) | signal (real - shuffled) "
    head += "| fit | faint |"
    lines = [caption, "", head, "|---|---|---|---|---|---|"]
    for c in args.configs:

        def arm(kind, name="toy", c=c):  # (S, P): the seeds' scores of one arm
            return torch.stack([scores(results, f"{names[c]}-{kind}-s{seed}", name) for seed in args.seeds])

        real, shuf = arm("real"), arm("shuffled")
        pairs = (paired(real, base["toy"]), paired(shuf, base["toy"]), paired(real, shuf))
        cells = [f"{m:+.3f} +- {se:.3f}" for m, se in pairs]
        cells += [f"{arm('real', 'fit').mean():.2f} / {arm('shuffled', 'fit').mean():.2f}"]
        cells += [f"{arm('real', 'faint').mean():.3f} / {arm('shuffled', 'faint').mean():.3f}"]
        lines.append(f"| `{c or '(preset)'}` | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    (Path(args.output_dir) / "table.md").write_text(table + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["train"]:
        train(sys.argv[2:])
    else:
        main(tyro.cli(Args))
