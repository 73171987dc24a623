"""End to end: the trainers as subprocesses on the toy world (1 process and torchrun x 2 on CPU), resume, bad
input."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from plumbing.runtime import UsageError, cli

ROOT = Path(__file__).resolve().parents[1]
# Tiny settings: 2 prompts x 4 images per rank, 6 steps (T = 5 trainable), 2 optimizer steps per iteration.
TINY = [
    "--preset",
    "toy",
    "--prompts-per-rank",
    "2",
    "--num-generations",
    "4",
    "--num-steps",
    "6",
    "--gradient-accumulation-steps",
    "4",
    "--image-every",
    "1",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def train(script, out, *extra, nproc=1, check=True):
    launcher = (
        [sys.executable]
        if nproc == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    )
    cmd = [*launcher, str(ROOT / script), *TINY, "--output-dir", str(out), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def metrics(out):
    return [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]


def weights(folder):
    from safetensors.torch import load_file

    return {k: v for f in sorted(Path(folder).glob("*.safetensors")) for k, v in load_file(f).items()}


def check_run(out, iterations):
    rows = metrics(out)
    assert [r["iteration"] for r in rows] == list(range(1, iterations + 1))
    for r in rows:
        assert all(math.isfinite(v) for v in r.values()), r
        assert r["ratio_first"] < 1e-6  # invariant 2: before the first update, re-scoring gives ratio == 1
    assert Path(out, "samples", "iter_00001.png").is_file()
    return rows


# the straight run: half the steps trained (the preset trains all), as train_chunk.py trains half its chunks
STRAIGHT = [
    "--num-iterations",
    "4",
    "--checkpoint-every",
    "2",
    "--ema-decay",
    "0.5",
    "--timestep-fraction",
    "0.5",
]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """4 iterations of step-level GRPO, a checkpoint every 2 (with an average of the weights), shared by the
    run, checkpoint, resume tests; the chunks-of-one test checks that train_chunk.py draws the same steps."""
    out = tmp_path_factory.mktemp("grpo")
    train("train_grpo.py", out, *STRAIGHT)
    return out


def test_grpo_toy_run_logs_finite_metrics_and_saves_a_stock_loadable_checkpoint(straight):
    from diffusers import FluxTransformer2DModel

    rows = check_run(straight, 4)
    assert rows[0]["num_trajectories"] == 8 and 0 <= rows[0]["reward"] <= 1
    ckpt = Path(straight, "checkpoints", "iter_00004")
    model = FluxTransformer2DModel.from_pretrained(ckpt / "transformer")  # the stock class, no project code
    base = FluxTransformer2DModel.from_pretrained(ROOT / "assets" / "toy" / "transformer")
    moved = max(
        (a - b).abs().max().item()
        for a, b in zip(model.state_dict().values(), base.state_dict().values(), strict=True)
    )
    assert moved > 0, "training did not change the weights"
    average = FluxTransformer2DModel.from_pretrained(ckpt / "ema").state_dict()  # between the two
    for other in (model.state_dict(), base.state_dict()):
        assert max((average[k] - other[k]).abs().max().item() for k in average) > 0


def test_resume_equals_an_uninterrupted_run(straight, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(Path(straight, "checkpoints", "iter_00002"), out / "checkpoints" / "iter_00002")
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics(straight)[:2]))
    train("train_grpo.py", out, *STRAIGHT, "--resume")
    for folder in ("transformer", "ema"):
        a, b = (weights(run / "checkpoints/iter_00004" / folder) for run in (straight, out))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]  # noqa: E731
    assert strip(metrics(out)) == strip(metrics(straight))


def test_chunks_of_one_step_rerun_step_level_grpo(straight, tmp_path):
    """train_chunk.py on uniform chunks of size 1 draws train_grpo.py's steps and gives its gradient: the two
    runs match, up to the order of float sums inside a forward (chunks come sorted, steps do not)."""
    flags = [
        "--num-iterations",
        "2",
        "--checkpoint-every",
        "2",
        "--chunk-layout",
        "uniform",
        "--chunk-size",
        "1",
    ]
    train("train_chunk.py", tmp_path, *flags)
    assert [r["reward"] for r in metrics(tmp_path)] == [r["reward"] for r in metrics(straight)[:2]]
    a = weights(straight / "checkpoints/iter_00002/transformer")
    b = weights(tmp_path / "checkpoints/iter_00002/transformer")
    base = weights(ROOT / "assets/toy/transformer")
    moved = max((a[k] - base[k]).abs().max().item() for k in a)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-3 * moved


@pytest.mark.parametrize("weighted", [False, True])
def test_chunk_toy_run(tmp_path, weighted):
    flags = ["--chunk-layout", "fixed", "--chunk-sizes", "1", "2", "2"]
    flags += ["--chunk-weighted-sampling", "--sde-window", "3"] if weighted else []  # the window: chunks 0, 1
    train("train_chunk.py", tmp_path, "--num-iterations", "2", *flags)
    rows = check_run(tmp_path, 2)
    hist = [rows[0][f"chunks/{j}"] for j in range(3)]  # 8 trajectories x max(1, int(3 * 0.5)) = 1 chunk each
    assert sum(hist) == 8 and (hist[2] == 0 or not weighted)


@pytest.mark.parametrize("script", ["train_grpo.py", "train_chunk.py"])
def test_torchrun_two_ranks(tmp_path, script):
    # Chunks of 1 and 4 steps in forwards of 2 rows: the ranks pack different numbers of forwards.
    chunks = [
        "--chunk-layout",
        "fixed",
        "--chunk-sizes",
        "1",
        "4",
        "--train-batch-size",
        "2",
        "--timeout",
        "60",
    ]
    extra = chunks if script == "train_chunk.py" else []
    train(script, tmp_path, "--num-iterations", "2", *extra, nproc=2)
    rows = check_run(tmp_path, 2)
    for r in rows:
        assert r["num_trajectories"] == 16  # the logged rewards cover both ranks' 8 trajectories
    # The sharded weights were gathered into one stock checkpoint, and they moved.
    trained = weights(tmp_path / "checkpoints" / "iter_00002" / "transformer")
    base = weights(ROOT / "assets" / "toy" / "transformer")
    assert trained.keys() == base.keys() and any(not torch.equal(trained[k], base[k]) for k in base)


def test_bad_input_ends_with_one_clear_line(tmp_path):
    proc = train("train_grpo.py", tmp_path, "--prompts", str(tmp_path / "missing.txt"), check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        f"error: prompts file {str(tmp_path / 'missing.txt')!r} not found; "
        "pass --prompts FILE (one prompt per line), a named set (hpdv2:train, hpdv2:test, pickapic:train, "
        "pickapic:test) or toy"
    ]


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--prompts", "EMPTY"], "has no prompts"),
        (["--reward", "no-such-reward"], "no-such-reward"),
        (
            ["--num-generations", "3"],
            "6 trajectories per rank is not divisible by --gradient-accumulation-steps 4",
        ),
        (["--model", "/no/such/model"], "cannot load model '/no/such/model'"),
        (["--num-generations", "1"], "--num-generations 1"),
        (["--preset", "nope"], "unknown preset 'nope'"),
    ],
)
def test_bad_input_messages(tmp_path, flags, message):
    import train_grpo

    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    argv = TINY + ["--output-dir", str(tmp_path)] + [str(empty) if f == "EMPTY" else f for f in flags]
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        train_grpo.main(cli(train_grpo.Args, train_grpo.PRESETS, argv))
