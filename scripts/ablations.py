"""
Chunk-GRPO's ablations (arXiv 2510.21583) on the toy world, with seeds, a control and learning curves. One
command reruns the whole study and writes its table and figures; run it again and it resumes where it stopped.

    python -m scripts.ablations                   # everything: about 2 h on 2 cores
    python -m scripts.ablations --only step control --seeds 0 --iterations 4 --output-dir /tmp/a

Every run is a trainer's toy preset (train_grpo, train_chunk or train_awm) plus its configuration's flags, one
CPU thread a process, --jobs processes at once. After training, a run's checkpoints are scored on held-out
prompts of the toy grammar (17-step ODE; a prompt's noise is fixed by its index, so every model sees the same
noise): every --eval-every iterations on the first --curve-prompts prompts, the last one on --num-prompts,
with the verifier's reward, its strict accuracy and two measures of clean drawing it does not read (eval.py's
`fit` and `faint`). A finished run leaves heldout.json; an interrupted one continues from its last checkpoint.

Writes --output-dir/{table.md, results.json} and, with matplotlib, assets/ablation_{curves,sweep}.png
(held-out and training reward per configuration, mean over seeds +- 1 std; the sweep of chunk sizes). The
table has, per configuration, the share of clipped ratios and their spread (at the presets the clip never
binds; the `-8x` settings make it bind), and, under the claims, the seeds' power: the pooled SD of the paired
differences, the seeds a difference of 0.01 needs and the smallest difference the seeds run can detect.
"""

import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

import eval as ev
from plumbing import toy
from plumbing.checkpoints import checkpoints
from plumbing.models import load_model
from plumbing.prompts import PromptSource
from plumbing.recipes import EVAL
from plumbing.tables_and_figures import geneval_breakdown, plot_seed_curves, seed_power, t_quantile
from rewards import build_reward

ROOT = Path(__file__).resolve().parent.parent
W = ["--chunk-weighted-sampling"]
GCPO_LAYOUT = ["--chunk-layout", "fixed", "--chunk-sizes", "2", "3", "4", "7"]
BIND = ["--gradient-accumulation-steps", "8", "--clip-range", "1e-4"]
# name: (trainer, flags, what it is). The toy chunk preset cuts the toy model's own L1rel curve into 4 chunks.
STUDY = {
    "step": ("train_grpo.py", [], "step-level GRPO"),
    "chunk": ("train_chunk.py", [], "chunk-level, L1rel-curve layout, uniform selection"),
    "chunk-weighted": ("train_chunk.py", W, "chunk-level, L1rel-curve layout, weighted selection (GCPO)"),
    "chunk-gcpo-layout": ("train_chunk.py", W + GCPO_LAYOUT, "chunk-weighted, GCPO's layout [2, 3, 4, 7]"),
    "control": ("train_chunk.py", W + ["--chunk-ratio", "step"], "chunk-weighted's steps, a ratio per step"),
    "step-slas-0.5": ("train_grpo.py", ["--slas-gamma", "0.5"], "step-level, SLAS gamma 0.5"),
    "step-slas-1.0": ("train_grpo.py", ["--slas-gamma", "1.0"], "step-level, SLAS gamma 1.0"),
    "chunk-weighted-slas-0.5": ("train_chunk.py", W + ["--slas-gamma", "0.5"], "chunk-weighted, SLAS 0.5"),
    "chunk-weighted-slas-1.0": ("train_chunk.py", W + ["--slas-gamma", "1.0"], "chunk-weighted, SLAS 1.0"),
    "step-batch-std": ("train_grpo.py", ["--adv-std", "batch"], "step-level, Flow-GRPO's batch std"),
    "awm": ("train_awm.py", [], "AWM: the likelihood-free objective on the same rollouts"),
    # Where the clip binds: 8 optimizer steps per rollout batch (of 8 trajectories each, not 2 of 32) and
    # Flow-GRPO's clip 1e-4; at the presets' 2 steps and clip 1e-3 almost no ratio leaves 1 +- 1e-3.
    "step-8x": ("train_grpo.py", BIND, "step-level, 8 optimizer steps per rollout, clip 1e-4"),
    "chunk-weighted-8x": ("train_chunk.py", W + BIND, "chunk-weighted, 8 optimizer steps, clip 1e-4"),
    "control-8x": ("train_chunk.py", W + ["--chunk-ratio", "step"] + BIND, "control, 8 steps, clip 1e-4"),
}
SIZES = (1, 2, 4, 8, 16)  # uniform chunk sizes over T = 16: 1 is step-level, 16 sequence-level
SWEEP = {
    f"size-{s}": ("train_chunk.py", ["--chunk-layout", "uniform", "--chunk-size", str(s)], f"chunks of {s}")
    for s in SIZES
}
CONFIGS = STUDY | SWEEP
# The paper's claims as paired comparisons (A, B): A - B per seed, both runs with the same prompts and noise.
CLAIMS = [
    ("chunk-level beats step-level", "chunk", "step"),
    ("weighted chunk selection helps", "chunk-weighted", "chunk"),
    ("chunk-weighted beats step-level", "chunk-weighted", "step"),
    ("the L1rel-curve layout vs GCPO's [2, 3, 4, 7]", "chunk-weighted", "chunk-gcpo-layout"),
    ("the shared chunk ratio and clip matter (3 vs 5)", "chunk-weighted", "control"),
    ("SLAS 0.5 helps step-level", "step-slas-0.5", "step"),
    ("SLAS 1.0 helps step-level", "step-slas-1.0", "step"),
    ("SLAS 0.5 helps chunk-weighted", "chunk-weighted-slas-0.5", "chunk-weighted"),
    ("SLAS 1.0 helps chunk-weighted", "chunk-weighted-slas-1.0", "chunk-weighted"),
    ("batch std vs group std (step-level)", "step-batch-std", "step"),
    ("chunks of size 1 are step-level (must be ~0)", "size-1", "step"),
    ("likelihood-free AWM vs step-level GRPO", "awm", "step"),
    ("8 optimizer steps per rollout vs 2 (step-level)", "step-8x", "step"),
    ("chunk-weighted beats step-level, clip binding", "chunk-weighted-8x", "step-8x"),
    ("the shared chunk ratio and clip matter, clip binding", "chunk-weighted-8x", "control-8x"),
]
# Pairs that take the same gradient to 1e-4 unless the clip binds: their differences are ~0 by construction,
# so the power estimate (the SD of the other claims' differences, pooled) leaves them out.
SAME_GRADIENT = {("chunk-weighted", "control"), ("size-1", "step")}
SCORES = {"reward": "toy", "strict": "strict", "fit": "fit", "faint": "faint"}  # heldout.json's: eval's names
CATEGORIES = ("single_object", "counting", "position", "two_object", "relation")


@dataclass
class Args:
    iterations: int = 16
    """training iterations of every run (the toy presets run 100; shortened so the study fits ~2 h)"""
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    """seeds of each configuration"""
    sweep_seeds: tuple[int, ...] = (0, 1, 2)
    """seeds of each chunk size of the sweep"""
    jobs: int = 2
    """runs at once, one CPU thread each"""
    eval_every: int = 8
    """iterations between the held-out points of the learning curves (and between checkpoints)"""
    curve_prompts: int = 200
    """held-out prompts of each intermediate point of the curves"""
    num_prompts: int = 500
    """held-out prompts of the base and of each run's last checkpoint (the table)"""
    only: tuple[str, ...] = ()
    """run and report only these configurations (names in scripts/ablations.py); default: all"""
    output_dir: str = "assets/ablation"
    """runs/, table.md and results.json"""
    figures_dir: str = "assets"
    """ablation_curves.png and ablation_sweep.png, for the README"""
    job: str | None = None
    """internal: run one job (`base` or `NAME:SEED`) in this process"""


# ----------------------------------------------------------------------------- one job
def score(model, reward_fn, folder, prompts, label):
    """Per-prompt held-out reward, 0/1 strict accuracy and the drawing's `fit` and `faint` (eval.py's
    drawing_quality, which the verifier does not read) of the toy model (folder None: the base)."""
    args = ev.Args(**EVAL["toy"])
    rows = [(label, folder, args.num_steps)]
    records, _ = ev.evaluate(model, rows, prompts, reward_fn, args, toy_world=True)
    records.sort(key=lambda r: r["prompt_index"])
    return {key: [r["scores"][name] for r in records] for key, name in SCORES.items()}


def run_job(args: Args, job: str):
    """Train one configuration and seed (or score the base), then score its checkpoints into heldout.json."""
    torch.set_num_threads(1)
    prompts = PromptSource("toy:heldout", toy_split="heldout").head(args.num_prompts)
    out = Path(args.output_dir, "runs", job.replace(":", "-s"))
    start = time.perf_counter()
    model = load_model("toy", quantize_timestep=True)  # loaded once for every score of the job
    reward_fn = build_reward(["toy"])
    if job == "base":
        points = {"0": score(model, reward_fn, None, prompts, "base")}
    else:
        name, seed = job.split(":")
        trainer, flags, _ = CONFIGS[name]
        command = [sys.executable, str(ROOT / trainer), "--preset", "toy", "--seed", seed, "--resume"]
        command += ["--num-iterations", str(args.iterations), "--checkpoint-every", str(args.eval_every)]
        command += ["--image-every", "0", "--output-dir", str(out), *flags]
        subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        points = {}
        found = checkpoints(out)
        for ckpt in found:
            subset = prompts if ckpt == found[-1] else prompts[: args.curve_prompts]
            it = str(int(ckpt.name.split("_")[1]))
            points[it] = score(model, reward_fn, ckpt / "transformer", subset, ckpt.name)
    record = {"job": job, "seconds": time.perf_counter() - start, "points": points}
    out.mkdir(parents=True, exist_ok=True)
    (out / "heldout.json").write_text(json.dumps(record))
    for ckpt in checkpoints(out)[:-1]:  # scored and recorded: only the last checkpoint is kept
        shutil.rmtree(ckpt)


def spawn(args: Args, job: str, log: Path) -> float:
    """Run one job in a fresh one-thread process; its wall time in minutes."""
    flags = ["--iterations", str(args.iterations), "--eval-every", str(args.eval_every)]
    flags += ["--curve-prompts", str(args.curve_prompts), "--num-prompts", str(args.num_prompts)]
    flags += ["--output-dir", args.output_dir, "--figures-dir", args.figures_dir, "--job", job]
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        command = [sys.executable, "-m", "scripts.ablations", *flags]
        proc = subprocess.run(command, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise RuntimeError(f"job {job} failed (exit {proc.returncode}); see {log}")
    return (time.perf_counter() - start) / 60


# ----------------------------------------------------------------------------- the report
def mean_sd_se(x: list[float]) -> tuple[float, float, float]:
    t = torch.tensor(x, dtype=torch.float64)
    sd = t.std().item() if len(t) > 1 else float("nan")
    return t.mean().item(), sd, sd / len(t) ** 0.5


def load_runs(args: Args, names):
    """{name: {seed: heldout record + its training rewards}} of the finished runs."""
    runs = {}
    for name in names:
        for path in sorted(Path(args.output_dir, "runs").glob(f"{name}-s[0-9]*/heldout.json")):
            config, seed = path.parent.name.rsplit("-s", 1)  # "step-s*" also matches "step-slas-0.5-s0"
            if config != name:
                continue
            seed = int(seed)
            record = json.loads(path.read_text())
            metrics = [json.loads(line) for line in (path.parent / "metrics.jsonl").read_text().splitlines()]
            record["train"] = [m["reward"] for m in metrics]
            record["clip"] = [m["clip_frac"] for m in metrics]  # of every optimizer step's unit ratios
            record["ratio_rms"] = [(2 * m["approx_kl"]) ** 0.5 for m in metrics]  # sqrt(mean (log r)^2)
            runs.setdefault(name, {})[seed] = record
    return runs


def summarize(args: Args, names) -> dict:
    base = json.loads(Path(args.output_dir, "runs", "base", "heldout.json").read_text())["points"]["0"]
    prompts = PromptSource("toy:heldout", toy_split="heldout").head(args.num_prompts)
    cats = [toy.category(p) for p in prompts]
    r0 = torch.tensor(base["reward"], dtype=torch.float64)
    drawing = lambda p: {k: mean(p[k]) if k in p else math.nan for k in ("fit", "faint")}  # noqa: E731
    out = {"base": {"reward": r0.mean().item(), "categories": breakdown(base["strict"], cats)}, "configs": {}}
    out["base"] |= drawing(base)
    for name, seeds in load_runs(args, names).items():
        rows = {}
        for seed, rec in sorted(seeds.items()):
            final = rec["points"][max(rec["points"], key=int)]
            d = torch.tensor(final["reward"], dtype=torch.float64) - r0  # paired with the base, per prompt
            rows[seed] = {
                "delta": d.mean().item(),
                "delta_se": (d.std() / len(d) ** 0.5).item(),
                "categories": breakdown(final["strict"], cats),
                # every point of a curve on the same first curve_prompts prompts (the last one scored more)
                "curve": {it: mean(p["reward"][: args.curve_prompts]) for it, p in rec["points"].items()},
                "curve_base": mean(base["reward"][: args.curve_prompts]),
                "train": rec["train"],
                "minutes": rec["seconds"] / 60,
                "clip": mean(rec["clip"]),
                "clip_max": max(rec["clip"]),
                "ratio_rms": mean(rec["ratio_rms"]),
                **drawing(final),
            }
        out["configs"][name] = {"description": CONFIGS[name][2], "seeds": rows}
    return out


mean = lambda x: sum(x) / len(x)  # noqa: E731


def breakdown(strict, cats):
    """Strict accuracy per category and overall; nan for a category none of the prompts has."""
    return dict.fromkeys(("overall", *CATEGORIES), math.nan) | geneval_breakdown(torch.tensor(strict), cats)


def markdown(summary: dict, args: Args) -> str:
    configs = summary["configs"]
    lines = [
        f"Toy world, {args.iterations} iterations per run; held-out: {args.num_prompts} prompts, 17-step "
        f"ODE, the same noise for every model. Base: reward {summary['base']['reward']:.3f}. Delta = "
        "held-out reward minus the base's, paired by prompt; mean +- standard error over seeds (SD: the "
        "seeds' spread; paired SE: the evaluation's own error of one run, averaged). Clipped: the share of "
        "trained units (steps or chunks) whose ratio left 1 +- clip, over all iterations (and the worst "
        "iteration); RMS log r: the ratios' spread, sqrt of the mean (log r)^2, in units of 1e-4.",
        "",
        "| configuration | seeds | Delta reward | SD | paired SE | per seed | clipped % | RMS log r | "
        + " | ".join(("strict", *CATEGORIES, "fit", "faint %"))
        + " |",
        "|---" * (11 + len(CATEGORIES)) + "|",
    ]
    accuracy = lambda cats: " | ".join(f"{cats[k]:.3f}" for k in ("overall", *CATEGORIES))  # noqa: E731
    quality = lambda fit, faint: f"{fit:.3f} | {100 * faint:.1f}"  # noqa: E731
    base = summary["base"]
    drawn = quality(base["fit"], base["faint"])
    lines.append(f"| base | - | - | - | - | - | - | - | {accuracy(base['categories'])} | {drawn} |")
    for name, c in configs.items():
        seeds = c["seeds"].values()
        m, sd, se = mean_sd_se([s["delta"] for s in seeds])
        pse = mean([s["delta_se"] for s in seeds])
        cats = {k: mean([s["categories"][k] for s in seeds]) for k in ("overall", *CATEGORIES)}
        per_seed = " ".join(f"{s['delta']:+.3f}" for s in seeds)
        clip = f"{100 * mean([s['clip'] for s in seeds]):.2f} ({100 * max(s['clip_max'] for s in seeds):.1f})"
        ratios = f"{clip} | {1e4 * mean([s['ratio_rms'] for s in seeds]):.2f}"
        row = (
            f"| {name} | {len(seeds)} | {m:+.3f} +- {se:.3f} | {sd:.3f} | {pse:.3f} | {per_seed} | {ratios} |"
        )
        drawn = quality(mean([s["fit"] for s in seeds]), mean([s["faint"] for s in seeds]))
        lines.append(f"{row} {accuracy(cats)} | {drawn} |")
    lines += ["", "| claim | A - B | paired by seed: mean +- SE | SD | seeds | reading |", "|---" * 6 + "|"]
    diffs_of = {}
    for claim, a, b in CLAIMS:
        if a not in configs or b not in configs:
            continue
        common = sorted(set(configs[a]["seeds"]) & set(configs[b]["seeds"]))
        diffs = [configs[a]["seeds"][s]["delta"] - configs[b]["seeds"][s]["delta"] for s in common]
        if (a, b) not in SAME_GRADIENT:
            diffs_of[claim] = diffs
        m, sd, se = mean_sd_se(diffs)
        reading = "too few seeds" if len(diffs) < 2 else "no difference detected"
        if len(diffs) > 1 and abs(m) > t_quantile(0.975, len(diffs) - 1) * se:
            reading = f"{a} {'higher' if m > 0 else 'lower'} (|t| > {t_quantile(0.975, len(diffs) - 1):.2f})"
        lines.append(f"| {claim} | {a} - {b} | {m:+.3f} +- {se:.3f} | {sd:.3f} | {len(diffs)} | {reading} |")
    return "\n".join(lines) + "\n\n" + seed_power(list(diffs_of.values()))


def plot(summary: dict, args: Args):
    """ablation_curves.png: held-out and training reward of the study's configurations; ablation_sweep.png:
    the chunk sizes'."""
    Path(args.figures_dir).mkdir(parents=True, exist_ok=True)
    for filename, group in {"ablation_curves.png": STUDY, "ablation_sweep.png": SWEEP}.items():
        names = [n for n in group if n in summary["configs"]]
        if names:
            plot_seed_curves(Path(args.figures_dir, filename), summary["configs"], names)


# ----------------------------------------------------------------------------- main
def main(args: Args):
    if args.job is not None:
        return run_job(args, args.job)
    unknown = set(args.only) - set(CONFIGS)
    if unknown:
        sys.exit(f"error: unknown configuration(s) {sorted(unknown)}; choose from {', '.join(CONFIGS)}")
    names = [n for n in CONFIGS if not args.only or n in args.only]
    # seed-major: a study stopped early has every configuration at its first seeds
    pairs = [(s, n) for n in names for s in (args.sweep_seeds if n in SWEEP else args.seeds)]
    jobs = ["base"] + [f"{n}:{s}" for s, n in sorted(pairs, key=lambda p: p[0])]
    runs = Path(args.output_dir, "runs")
    todo = [j for j in jobs if not (runs / j.replace(":", "-s") / "heldout.json").is_file()]
    print(f"{len(jobs)} jobs, {len(jobs) - len(todo)} already done, {args.jobs} at a time")
    done, failed = 0, []

    def one(job):
        nonlocal done
        log = runs.parent / "logs" / f"{job.replace(':', '-s')}.log"
        try:
            minutes = spawn(args, job, log)
        except RuntimeError as e:  # the other jobs go on; the study reports what finished, then fails
            failed.append(job)
            return print(f"error: {e}", flush=True)
        done += 1
        print(f"[{done}/{len(todo)}] {job}: {minutes:.1f} min", flush=True)

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(one, todo))
    if "base" in failed:
        sys.exit("error: the base model's evaluation failed; nothing to compare against")
    summary = summarize(args, names)
    Path(args.output_dir, "results.json").write_text(json.dumps(summary, indent=1))
    table = markdown(summary, args)
    Path(args.output_dir, "table.md").write_text(table)
    print(table)
    plot(summary, args)
    if failed:
        sys.exit(f"error: {len(failed)} job(s) failed ({', '.join(failed)}); rerun to retry them")


if __name__ == "__main__":
    main(tyro.cli(Args))
