"""A run never dies silently and never lies: bad flags end with one line before anything loads, a non-finite
reward drops its trajectory, a non-finite gradient skips its step, and a hung rank ends the job."""

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest
import torch

import chunking
import eval
import train_chunk
import train_grpo
from plumbing.models import load_model, load_transformer
from plumbing.prompts import PromptSource
from plumbing.runtime import UsageError, cli, declared_range
from rewards import build_reward
from sampler import mode_defaults, rollout
from scripts import bench, pretrain_toy

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "toy", "--prompts-per-rank", "2", "--num-generations", "4", "--num-steps", "6"]
TINY += ["--gradient-accumulation-steps", "4", "--image-every", "0", "--num-iterations", "2"]
SCRIPTS = {
    "train_grpo": (train_grpo.Args, train_grpo.PRESETS),
    "train_chunk": (train_chunk.ChunkArgs, train_chunk.PRESETS),
    "eval": (eval.Args, eval.PRESETS),
    "chunking": (chunking.Args, None),
    "pretrain_toy": (pretrain_toy.Args, None),
    "bench": (bench.Args, None),
}
BAD_FLAGS = [  # (script, flags, the start of the one-line message)
    ("train_grpo", ["--clip-range", "-0.1"], "--clip-range -0.1: must be > 0"),
    ("train_grpo", ["--adv-clip-max", "-1"], "--adv-clip-max -1.0: must be > 0"),
    ("train_grpo", ["--max-grad-norm", "-1"], "--max-grad-norm -1.0: must be > 0"),
    ("train_grpo", ["--timestep-fraction", "0"], "--timestep-fraction 0.0: must be in (0, 1]"),
    ("train_grpo", ["--timestep-fraction", "2"], "--timestep-fraction 2.0: must be in (0, 1]"),
    ("train_grpo", ["--eta", "0"], "--eta 0.0: must be > 0"),
    ("train_grpo", ["--eta", "nan"], "--eta nan: must be > 0"),
    ("train_grpo", ["--learning-rate", "-1e-5"], "--learning-rate -1e-05: must be > 0"),
    ("train_grpo", ["--weight-decay", "-1"], "--weight-decay -1.0: must be >= 0"),
    ("train_grpo", ["--adam-betas", "1.0", "0.999"], "--adam-betas 1.0 0.999: must be in [0, 1)"),
    ("train_grpo", ["--height", "0"], "--height 0: must be a positive multiple of 16"),
    ("train_grpo", ["--width", "33"], "--width 33: must be a positive multiple of 16"),
    ("train_grpo", ["--checkpoint-every", "0"], "--checkpoint-every 0: must be >= 1"),
    ("train_grpo", ["--train-batch-size", "0"], "--train-batch-size 0: must be >= 1"),
    ("train_grpo", ["--rollout-batch-size", "0"], "--rollout-batch-size 0: must be >= 1"),
    ("train_grpo", ["--num-steps", "1"], "--num-steps 1: must be >= 2"),
    ("train_grpo", ["--seed", "-1"], "--seed -1: must be >= 0"),
    ("train_grpo", ["--timeout", "0"], "--timeout 0.0: must be > 0"),
    ("train_grpo", ["--device", "tpu"], "--device tpu: choose auto, cpu or cuda"),
    ("train_chunk", ["--chunk-fraction", "0"], "--chunk-fraction 0.0: must be in (0, 1]"),
    ("train_chunk", ["--chunk-sizes", "0", "5"], "--chunk-sizes 0 5: must be >= 1"),
    ("eval", ["--num-prompts", "0"], "--num-prompts 0: must be >= 1"),
    ("eval", ["--num-prompts", "-1"], "--num-prompts -1: must be >= 1"),
    ("eval", ["--prompts-per-batch", "0"], "--prompts-per-batch 0: must be >= 1"),
    ("eval", ["--grid-prompts", "-1"], "--grid-prompts -1: must be >= 0"),
    ("eval", ["--num-steps", "1"], "--num-steps 1: must be >= 2"),  # a changed default keeps its base's range
    ("chunking", ["--num-prompts", "0"], "--num-prompts 0: must be >= 1"),
    ("chunking", ["--eta", "-0.5"], "--eta -0.5: must be > 0"),
    ("pretrain_toy", ["--lr", "0"], "--lr 0.0: must be > 0"),
    ("pretrain_toy", ["--ema", "1"], "--ema 1.0: must be in [0, 1)"),
    ("bench", ["--iterations", "0"], "--iterations 0: must be >= 1"),
]


@pytest.mark.parametrize("script,flags,message", BAD_FLAGS)
def test_a_bad_flag_is_one_line_before_anything_loads(script, flags, message):
    cls, presets = SCRIPTS[script]
    argv = (["--preset", "toy"] if presets else []) + flags
    with pytest.raises(UsageError) as e:
        cli(cls, presets, argv)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_every_numeric_flag_declares_its_range():
    """The range of a numeric flag sits beside its declaration, where check_flags reads it."""
    # eval's --hybrid-steps is checked against --num-steps; pretrain_toy.check holds what a Range cannot say
    unchecked = {"hybrid_steps", "steps", "dim", "text_dim"}
    for name, (cls, _) in SCRIPTS.items():
        for f in fields(cls):
            numeric = f.type in (int, float) or "int" in str(f.type) or "float" in str(f.type)
            if numeric and f.name not in unchecked:
                assert declared_range(cls, f.name) is not None, f"{name} --{f.name.replace('_', '-')}"


def test_rl_refuses_the_deterministic_sampler(tmp_path):
    argv = TINY + ["--sde-mode", "ode", "--output-dir", str(tmp_path)]
    with pytest.raises(UsageError, match="--sde-mode ode is deterministic"):
        train_grpo.main(cli(train_grpo.Args, train_grpo.PRESETS, argv))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_missing_device_is_named():
    with pytest.raises(UsageError, match="no CUDA device"):
        cli(train_grpo.Args, train_grpo.PRESETS, ["--preset", "toy", "--device", "cuda"])


def test_bad_files_and_values_are_one_line(tmp_path):
    with pytest.raises(UsageError, match="finite number"):
        build_reward(["toy:nan"])
    binary = tmp_path / "prompts.bin"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(UsageError, match="not UTF-8 text"):
        PromptSource(str(binary))
    for text in ("{not json", json.dumps({"mean": [0.5] * 15 + [-1.0]}), json.dumps({"mean": "flat"})):
        (tmp_path / "curve.json").write_text(text)
        argv = ["--preset", "toy", "--chunk-curve", str(tmp_path / "curve.json")]
        with pytest.raises(UsageError, match="not an L1rel record"):
            train_chunk.layout(cli(train_chunk.ChunkArgs, train_chunk.PRESETS, argv))


def test_files_the_toy_reward_cannot_score_and_folders_eval_cannot_write(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na photo of a cat on the moon\n")
    argv = TINY + ["--prompts", str(prompts), "--output-dir", str(tmp_path / "run")]
    with pytest.raises(UsageError, match="the toy reward scores toy-grammar prompts.*a photo of a cat"):
        train_grpo.main(cli(train_grpo.Args, train_grpo.PRESETS, argv))
    (tmp_path / "a-file").write_text("")
    argv = ["--preset", "toy", "--num-prompts", "2", "--output-dir", str(tmp_path / "a-file")]
    with pytest.raises(UsageError, match="cannot write to the output folder"):
        eval.main(cli(eval.Args, eval.PRESETS, argv))


def test_a_checkpoint_of_another_family_is_refused(tiny_sd3_dir):
    model = load_model("toy")
    with pytest.raises(UsageError, match="holds a SD3Transformer2DModel"):
        load_transformer(model, tiny_sd3_dir / "transformer")


# ----------------------------------------------------------------------------- non-finite rewards and steps
def test_a_non_finite_reward_leaves_its_group_as_if_it_were_not_there():
    rewards = torch.tensor([0.2, float("nan"), 0.9, 0.4, 1.0, float("inf"), 0.0, 0.3])
    group = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    adv, frac = train_grpo.compute_advantages(rewards, group)
    alone, _ = train_grpo.compute_advantages(rewards[[0, 2, 3]], torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(adv[[0, 2, 3]], alone, atol=0, rtol=0)
    assert adv[1] == 0 and adv[5] == 0 and adv[4] == 0  # group 1 keeps one finite reward: no signal
    assert frac == pytest.approx(1 / 3) and torch.isfinite(adv).all()
    for options in (dict(adv_std="batch"), dict(slas_gamma=0.5)):
        assert torch.isfinite(train_grpo.compute_advantages(rewards, group, **options)[0]).all()


def test_a_dropped_trajectory_adds_nothing_to_the_gradient():
    model = load_model("toy")
    traj = rollout(model, ["a red circle", "two blue squares"], num_generations=3, num_steps=4, seed=0)
    args = mode_defaults(
        cli(train_grpo.Args, train_grpo.PRESETS, ["--preset", "toy", "--train-batch-size", "2"])
    )
    adv = torch.tensor([1.0, -0.5, 0.3, -1.2, 0.8, 0.4])
    steps = torch.tensor([[0, 2], [1, 2], [0, 1], [2, 0], [1, 1], [0, 2]])

    def gradient(rows, kept):
        learner = train_grpo.Learner(model, None, args)
        model.transformer.zero_grad()
        scale = 1.0 / int(kept[rows].sum())
        train_grpo.step_loss(learner, traj, adv, kept, rows, steps[rows], scale)
        return torch.cat([p.grad.flatten() for p in model.transformer.parameters() if p.grad is not None])

    kept = torch.ones(6)
    kept[2] = 0.0  # trajectory 2's reward was NaN
    with_it = gradient(torch.tensor([0, 2, 4, 5]), kept)
    without = gradient(torch.tensor([0, 4, 5]), torch.ones(6))
    torch.testing.assert_close(with_it, without, atol=1e-7, rtol=1e-5)
    assert with_it.abs().max() > 0


def nan_reward(index):
    """The toy verifier, with trajectory `index` of every batch scored NaN (a reward model's failure)."""
    toy_reward = build_reward(["toy"])

    def reward(images, prompts):
        total, parts = toy_reward(images, prompts)
        total[index] = float("nan")
        return total, parts

    return reward


def test_a_run_with_a_nan_reward_trains_on_and_logs_it(tmp_path, monkeypatch):
    monkeypatch.setattr(train_grpo, "build_reward", lambda *a, **k: nan_reward(0))
    train_grpo.main(cli(train_grpo.Args, train_grpo.PRESETS, TINY + ["--output-dir", str(tmp_path)]))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward_nonfinite"] for r in rows] == [1, 1] and all(math.isfinite(r["reward"]) for r in rows)
    assert [r["skipped_steps"] for r in rows] == [0, 0] and all(math.isfinite(r["grad_norm"]) for r in rows)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "checkpoints/iter_00002/transformer/diffusion_pytorch_model.safetensors")
    assert all(torch.isfinite(v).all() for v in saved.values())


def poisoned(calls):
    """The step objective, with a NaN planted in one gradient on the optimizer steps numbered in `calls`."""
    count = [0]

    def objective(learner, traj, adv, kept, rows, scale, generator):
        out = train_grpo.step_objective(learner, traj, adv, kept, rows, scale, generator)
        if count[0] in calls:
            grads = [p.grad for p in learner.model.transformer.parameters() if p.grad is not None]
            grads[0].view(-1)[0] = float("nan")
        count[0] += 1
        return out

    return objective


def test_a_non_finite_gradient_skips_its_step_and_too_many_stop_the_run(tmp_path):
    args = cli(train_grpo.Args, train_grpo.PRESETS, TINY + ["--output-dir", str(tmp_path / "once")])
    train_grpo.main(args, objective=poisoned({0}))
    rows = [json.loads(line) for line in (tmp_path / "once" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in rows] == [1, 0]
    args = cli(
        train_grpo.Args,
        train_grpo.PRESETS,
        TINY + ["--output-dir", str(tmp_path / "always"), "--max-skipped-steps", "3"],
    )
    with pytest.raises(UsageError, match=r"iteration 2: 3 optimizer steps in a row .* checkpoint: none"):
        train_grpo.main(args, objective=poisoned(set(range(10))))


# ----------------------------------------------------------------------------- a hung rank
def test_a_hung_rank_ends_the_job_after_the_timeout(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text(
        "import sys, time, types\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import torch.distributed as dist\n"
        "from runtime import setup_distributed\n"
        "_, rank, _ = setup_distributed(types.SimpleNamespace(device='cpu', timeout=3))\n"
        "if rank == 1:\n"
        "    time.sleep(60)  # a rank that stopped answering\n"
        "dist.barrier()\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and time.perf_counter() - start < 50, proc.stderr[-2000:]


def test_non_finite_weights_are_never_saved(tmp_path):
    from plumbing.checkpoints import save_checkpoint

    args = cli(train_grpo.Args, train_grpo.PRESETS, TINY + ["--output-dir", str(tmp_path)])
    policy = load_model("toy").transformer
    optimizer = torch.optim.AdamW(policy.parameters())
    with torch.no_grad():
        next(policy.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(UsageError, match="iteration 3: the weights hold NaN or infinity"):
        save_checkpoint(policy, optimizer, args, 3, 0)
    assert not (tmp_path / "checkpoints").exists()


def test_a_cuda_run_turns_off_sdpas_cudnn_backend(monkeypatch):
    # On an H200 (torch 2.11) it gave NaN gradients on the toy and an illegal memory access on FLUX.1-dev.
    import types

    from plumbing.runtime import setup_distributed

    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)  # no GPU needed to reach the switch
    enabled = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        device, _, _ = setup_distributed(types.SimpleNamespace(device="cuda", timeout=3))
        assert device == torch.device("cuda:0") and not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(enabled)
