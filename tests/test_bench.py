"""scripts/bench.py: its table at tiny size (one process, and torchrun x 2 on CPU), what its counts and floors
measure, the SD3 path with LoRA and a KL term, and the real sizes refused on a machine without a GPU."""

import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import train_chunk
from plumbing import recipes
from plumbing.runtime import UsageError
from sampler import mode_defaults, num_selected
from scripts import bench

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
PHASES = ["rollout", "decode", "reward", "train", "optimizer", "iteration"]


def table_of(out: str) -> dict:
    """The printed table: {phase: [wall, floor, wall/floor, peak GB, images/s, trans./s, TFLOP/s, MFU]}."""
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("phase"))
    return {line.split()[0]: line.split()[1:] for line in lines[head + 1 : head + 1 + len(PHASES)]}


def ratio_first(out: str) -> float:
    return float(re.search(r"ratio_first (\S+):", out).group(1))


def flops(out: str) -> tuple[float, float]:
    found = re.search(r"FLOPs: (\S+) G per sampled row, (\S+) G per trained transition", out)
    return float(found.group(1)), float(found.group(2))


def run_bench(monkeypatch, capsys, **flags):
    """bench.main in this process: the timed iterations' records and what it printed."""
    kept, table = {}, bench.table

    def keep(results, *args):
        kept["results"] = results
        return table(results, *args)

    monkeypatch.setattr(bench, "table", keep)
    bench.main(bench.Args(**flags))
    return kept["results"], capsys.readouterr().out


def check_table(out: str):
    table = table_of(out)
    assert list(table) == PHASES
    for name in ("rollout", "train", "iteration"):
        wall, floor, ratio = map(float, table[name][:3])
        assert wall > 0 and floor > 0 and ratio == pytest.approx(wall / floor, rel=0.1)  # of rounded
        assert float(table[name][4]) > 0 and float(table[name][6]) > 0  # images/s, TFLOP/s
    assert float(table["iteration"][0]) == pytest.approx(
        sum(float(table[name][0]) for name in ("rollout", "reward", "train")), abs=0.002
    )
    assert ratio_first(out) < 1e-6  # fp32: re-scoring the rollout's transitions gives ratio == 1


def test_bench_prints_its_table_at_tiny_size():
    cmd = [sys.executable, "-m", "scripts.bench", "--model", "tiny", "--iterations", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_table(proc.stdout)
    assert "chunk layout (uniform): [2, 2, 1]" in proc.stdout


def test_bench_runs_under_torchrun():
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd = [*launcher, "-m", "scripts.bench", "--model", "tiny", "--objective", "step", "--iterations", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cpu (threads: 1) x 2" in proc.stdout and proc.stdout.count("ratio_first") == 1  # rank 0 prints
    check_table(proc.stdout)


def test_the_train_floor_runs_as_many_transitions_as_the_objective_trained(monkeypatch, capsys):
    results, out = run_bench(monkeypatch, capsys, model="tiny", objective="step", iterations=2)
    t = bench.MODELS["tiny"].recipe
    k = num_selected(t["num_steps"] - 1, t["timestep_fraction"])  # the toy recipe's
    assert f"trained steps per trajectory: {k} of T = {t['num_steps'] - 1}" in out
    for r in results:
        assert r["rows"] == t["prompts_per_rank"] * t["num_generations"] * k  # counted as the objective ran
        assert r["rollout floor"] > 0 and r["train floor"] > 0 and r["decode"] > 0 and r["optimizer"] > 0
    check_table(out)


def test_the_awm_objective_trains_its_stratified_points(monkeypatch, capsys):
    results, out = run_bench(monkeypatch, capsys, model="tiny", objective="awm", iterations=1)
    t = bench.MODELS["tiny"].recipe
    k = num_selected(t["num_steps"] - 1, t["timestep_fraction"])  # one sigma of each of k strata a trajectory
    assert f"AWM: {k} of T = {t['num_steps'] - 1} sigmas" in out and "ratio_first 0.0e+00" in out
    assert all(r["rows"] == t["prompts_per_rank"] * t["num_generations"] * k for r in results)
    check_table(out)


def test_flops_count_a_backward_as_two_forwards_and_a_lora_as_less(monkeypatch, capsys):
    sampled, trained = flops(run_bench(monkeypatch, capsys, model="tiny", objective="step", iterations=1)[1])
    kl = 1 if bench.MODELS["tiny"].recipe["beta"] > 0 else 0  # the toy recipe's KL: a reference forward more
    assert 2.5 + kl < trained / sampled < 3.5 + kl  # forward + backward (both gradients), no recompute
    lora = flops(run_bench(monkeypatch, capsys, model="tiny", lora_rank=2, iterations=1)[1])
    assert lora[0] == pytest.approx(sampled, rel=0.05)  # rank 2 adds little to the forward
    assert lora[1] < trained  # a frozen base computes no weight gradients


def test_sd3_with_classifier_free_guidance_lora_and_a_kl_term(monkeypatch, capsys):
    sd3 = dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=1)
    sd3 |= dict(attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16)
    sd3 |= dict(joint_attention_dim=32, pooled_projection_dim=32)
    shapes = dict(prompts_per_rank=1, num_generations=2, num_steps=3, height=32, width=32, lora_rank=4)
    shapes |= dict(rollout_batch_size=2, train_batch_size=2, gradient_accumulation_steps=2)
    recipe = recipes.CHUNK["sd35"] | shapes  # CFG 4.5, all steps trained, KL beta 0.01
    monkeypatch.setitem(bench.MODELS, "tiny-sd3", bench.Size("sd3", sd3, bench.TINY_VAE, (8, 32, 32), recipe))
    results, out = run_bench(monkeypatch, capsys, model="tiny-sd3", objective="step", iterations=1)
    assert "LoRA r 4" in out and "trained steps per trajectory: 2 of T = 2" in out
    assert [r["rows"] for r in results] == [2 * 2]
    check_table(out)


@pytest.mark.parametrize("model, count", [("flux-dev", "11.90B"), ("sd35-medium", "2.24B")])
def test_the_real_sizes_need_a_gpu_unless_asked_for_the_cpu(monkeypatch, model, count):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # counted on the meta device: no memory
    with pytest.raises(UsageError, match=rf"--model {model} is a {count}-parameter .* --device cpu runs it"):
        bench.main(bench.Args(model=model))


@pytest.mark.parametrize("model, pixels", [("flux-dev", 720), ("sd35-medium", 512)])
def test_the_published_configurations_fit_together_on_the_meta_device(model, pixels):
    size = bench.MODELS[
        model
    ]  # transformer, VAE and embeddings at the recipe's shapes, without memory or time
    t = mode_defaults(replace(train_chunk.ChunkArgs(), **size.recipe))
    cls = bench.SD3Transformer2DModel if size.family == "sd3" else bench.FluxTransformer2DModel
    m = bench.build(size, cls, t, torch.device("meta"), torch.bfloat16)
    x = torch.randn(2, *m.latent_shape, device="meta")
    with torch.no_grad():
        v = m.velocity(m.transformer, x, torch.rand(2, device="meta"), m.encode_prompts(["a", "b"]))
        images = m.decode(x)
    assert v.shape == x.shape and images.shape == (2, 3, pixels, pixels)


def test_the_toy_size_is_the_committed_bundle():
    import json

    from plumbing.models import TOY_DIR

    for shapes, folder in ((bench.TOY, "transformer"), (bench.TOY_VAE, "vae")):
        config = json.loads((TOY_DIR / folder / "config.json").read_text())
        for key, value in shapes.items():
            expected = list(value) if isinstance(value, tuple) else value
            assert config[key] == expected, (folder, key)
