"""scripts/ablations.py end to end at a tiny scale: the base and two one-iteration runs in parallel, each
scored on held-out prompts, the table with its paired claim, and a rerun that resumes, not retrains."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMALL = [
    "--iterations",
    "1",
    "--eval-every",
    "1",
    "--num-prompts",
    "8",
    "--curve-prompts",
    "4",
    "--jobs",
    "2",
]


def ablations(out, *flags):
    command = [sys.executable, "-m", "scripts.ablations", *SMALL, "--output-dir", str(out)]
    command += ["--figures-dir", str(out)]  # never the repository's assets/
    proc = subprocess.run([*command, *flags], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def test_the_study_runs_scores_reports_and_resumes(tmp_path):
    part = ["--only", "step", "size-1", "--seeds", "0", "--sweep-seeds", "0"]
    out = ablations(tmp_path, *part)
    assert "3 jobs, 0 already done" in out
    summary = json.loads((tmp_path / "results.json").read_text())
    assert set(summary["configs"]) == {"step", "size-1"}
    step = summary["configs"]["step"]["seeds"]["0"]
    assert len(step["train"]) == 1 and set(step["curve"]) == {"1"}
    heldout = json.loads((tmp_path / "runs" / "step-s0" / "heldout.json").read_text())
    assert len(heldout["points"]["1"]["reward"]) == 8  # the last checkpoint on all --num-prompts
    table = (tmp_path / "table.md").read_text()
    assert "| step | 1 |" in table and "| size-1 | 1 |" in table
    assert "chunks of size 1 are step-level" in table and "too few seeds" in table
    stamp = (tmp_path / "runs" / "step-s0" / "heldout.json").stat().st_mtime
    assert "3 jobs, 3 already done" in ablations(tmp_path, *part)
    assert (tmp_path / "runs" / "step-s0" / "heldout.json").stat().st_mtime == stamp


def test_an_unknown_configuration_is_refused_with_the_names(tmp_path):
    command = [sys.executable, "-m", "scripts.ablations", "--only", "stepp"]
    proc = subprocess.run([*command, "--output-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and "unknown configuration" in proc.stderr and "chunk-weighted" in proc.stderr


def test_the_power_of_the_seeds_by_simulation():
    """A paired two-sided t-test at 5% (t_quantile) rejects 5% of null experiments, and ~80% of experiments
    whose true difference is minimum_detectable (the normal-shift formula is a little low at few seeds)."""
    import torch

    from plumbing.tables_and_figures import minimum_detectable, t_quantile

    for n in (3, 5, 15):  # the table (df 2, 4) and the expansion beyond it (df 14)
        gen = torch.Generator().manual_seed(n)
        rates = []
        for true in (0.0, minimum_detectable(0.5, n)):
            x = 0.5 * torch.randn(40_000, n, generator=gen, dtype=torch.float64) + true
            t = x.mean(1) / (x.std(1) / n**0.5)
            rates.append((t.abs() > t_quantile(0.975, n - 1)).double().mean().item())
        assert abs(rates[0] - 0.05) < 0.006
        assert 0.74 < rates[1] < 0.84 and (n < 5 or rates[1] > 0.78)


def test_pooled_sd_and_the_seeds_needed():
    import torch

    from plumbing.tables_and_figures import minimum_detectable, pooled_sd, seeds_needed

    samples = [[0.1, 0.3, 0.2], [1.0, 1.4], [5.0]]  # a one-seed sample has no spread to give
    residuals = torch.tensor([-0.1, 0.1, 0.0, -0.2, 0.2], dtype=torch.float64)
    sd, df = pooled_sd(samples)
    assert df == 3 and abs(sd - (residuals.square().sum() / 3).sqrt().item()) < 1e-12
    n = seeds_needed(0.01, 0.01)
    assert minimum_detectable(0.01, n) <= 0.01 < minimum_detectable(0.01, n - 1)


def test_the_shuffled_twin_keeps_each_groups_rewards_and_drops_their_images():
    import torch

    from plumbing import toy
    from scripts.signal_vs_drift import shuffled_toy_reward

    prompts = [p for p in toy.sample_prompts("train", 4, seed=0) for _ in range(16)]  # 4 groups of 16
    images = toy.render(prompts, seed=1)
    images[::2] = 0  # half the images blank: their true scores differ from the others'
    truth = toy.verify(images, prompts).score.float()
    fn = shuffled_toy_reward()
    first, second = fn(images, prompts), fn(images, prompts)
    for g in range(4):  # each group: the same multiset of scores, not in the images' order
        rows = slice(16 * g, 16 * g + 16)
        assert torch.equal(first[rows].sort().values, truth[rows].sort().values)
    assert not torch.equal(first, truth) and not torch.equal(first, second)  # a fresh permutation per call


def test_signal_vs_drift_end_to_end_and_resumed(tmp_path):
    command = [
        sys.executable,
        "-m",
        "scripts.signal_vs_drift",
        "--configs=--learning-rate 1e-4",
    ]
    command += ["--num-iterations", "1", "--num-prompts", "4", "--output-dir", str(tmp_path)]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    row = [
        line for line in (tmp_path / "table.md").read_text().splitlines() if "`--learning-rate 1e-4`" in line
    ]
    assert len(row) == 1 and row[0].count("+-") == 3
    logs = {p: p.stat().st_mtime for p in tmp_path.glob("*.log")}
    assert len(logs) == 2  # the real run and its shuffled twin
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert (
        again.returncode == 0 and {p: p.stat().st_mtime for p in tmp_path.glob("*.log")} == logs
    )  # not retrained


def test_gradient_snr_shuffle_keeps_groups_and_jackknife_matches_brute_force():
    import torch

    from scripts.gradient_snr import cosines, jackknife_se, shuffle_within_groups

    rewards, group = torch.arange(12.0), torch.arange(3).repeat_interleave(4)  # 3 groups of 4
    shuffled = shuffle_within_groups(rewards, group, torch.Generator().manual_seed(0))
    for g in range(3):
        assert torch.equal(shuffled[group == g].sort().values, rewards[group == g])
    assert not torch.equal(shuffled, rewards)
    grads = list(torch.randn(5, 40, generator=torch.Generator().manual_seed(1)) + 0.5)  # 5 "batches"
    pair = [torch.nn.functional.cosine_similarity(a, b, dim=0).item() for a in grads for b in grads]
    assert abs(cosines(grads) - (sum(pair) - 5) / 20) < 1e-6  # the mean over the 10 pairs (20 ordered)
    left_out = [cosines(grads[:i] + grads[i + 1 :]) for i in range(5)]
    mean = sum(left_out) / 5
    assert abs(jackknife_se(grads) - (4 / 5 * sum((c - mean) ** 2 for c in left_out)) ** 0.5) < 1e-6


def test_gradient_snr_runs_both_estimators(tmp_path):
    for objective in ("step", "awm"):
        command = [sys.executable, "-m", "scripts.gradient_snr", "--objective", objective, "--batches", "3"]
        command += [
            "--prompts-per-batch",
            "2",
            "--num-generations",
            "2",
            "--num-steps",
            "3",
            "--threads",
            "1",
        ]
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert "all steps: mean cosine" in proc.stdout and proc.stdout.count("| 1 |") == 1


def test_learning_curves_evaluate_every_checkpoint_of_every_seed(tmp_path):
    flags = ["--preset", "toy", "--num-iterations", "2", "--checkpoint-every", "1", "--image-every", "0"]
    flags += ["--prompts-per-rank", "2", "--num-generations", "2", "--gradient-accumulation-steps", "4"]
    for seed in (0, 1):
        out = tmp_path / f"step-s{seed}"
        cmd = [sys.executable, "train_grpo.py", *flags, "--seed", str(seed), "--output-dir", str(out)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    figure = tmp_path / "curves.png"
    command = [sys.executable, "-m", "scripts.learning_curves", "--num-prompts", "3", "--out", str(figure)]
    command += ["--eval-dir", str(tmp_path / "eval"), "--runs"]
    command += [f"step={tmp_path / 'step-s0'}", f"step={tmp_path / 'step-s1'}"]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    points = json.loads(figure.with_suffix(".json").read_text())
    seeds = points["step"]["seeds"]
    assert set(seeds) == {"0", "1"} and all(set(s["curve"]) == {"1", "2"} for s in seeds.values())
    assert all(len(s["train"]) == 2 for s in seeds.values())  # a training reward per iteration
    assert seeds["0"]["curve"] != seeds["1"]["curve"] or seeds["0"]["train"] != seeds["1"]["train"]
