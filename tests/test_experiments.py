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
