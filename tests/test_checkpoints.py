"""A run's folder cannot go wrong quietly: a used folder is refused before anything is written, an unreadable
checkpoint is skipped for the one before it (with a warning), a partial metrics line is dropped, and a
checkpoint of another run (other flags, other weights) is refused; a new learning rate is applied. In process,
on a tiny policy, except one resume of the real trainer."""

import json
import os
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

import train_chunk
import train_grpo
from plumbing.checkpoints import (
    checkpoints,
    loadable,
    read_checkpoint,
    read_policy,
    read_weights,
    resume,
    save_checkpoint,
    save_weights,
)
from plumbing.ema import WeightAverage
from plumbing.metrics import Logger
from plumbing.runtime import UsageError, check_output_dir
from test_train import metrics, train, weights


class Tiny(torch.nn.Module):
    """The least save_checkpoint needs of a policy: weights, and a diffusers-style save_config."""

    def __init__(self, width=3, name="proj"):
        super().__init__()
        self.add_module(name, torch.nn.Linear(width, 2))

    def forward(self, x):
        return next(iter(self.children()))(x)

    def save_config(self, folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
        Path(folder, "config.json").write_text(json.dumps({"_class_name": "Tiny"}))


# tests/test_train.py's tiny settings: 2 prompts x 4 images, 6 steps, 2 optimizer steps per iteration.
TINY = dict(prompts_per_rank=2, num_generations=4, num_steps=6, gradient_accumulation_steps=4)


def toy_args(out, cls=train_grpo.Args, **changes):
    """The toy preset's args, less its average of the weights unless asked for (train_and_save keeps none)."""
    preset = {**train_grpo.PRESETS["toy"], "output_dir": str(out), "resume": True, "ema_decay": 0.0}
    return replace(cls(), **{**preset, **changes})


def fresh(args, **tiny):
    torch.manual_seed(1)
    policy = Tiny(**tiny)
    adamw = dict(lr=args.learning_rate, betas=args.adam_betas, weight_decay=args.weight_decay)
    return policy, torch.optim.AdamW(policy.parameters(), **adamw)


def train_and_save(args, iterations=2):
    """One AdamW step and one checkpoint per iteration; each iteration's weights."""
    policy, optimizer = fresh(args)
    saved = {}
    for it in range(1, iterations + 1):
        policy(torch.randn(4, 3)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        save_checkpoint(policy, optimizer, args, it, rank=0)
        saved[it] = {k: v.clone() for k, v in policy.state_dict().items()}
    return saved


def snapshot(folder):
    return {str(p): p.read_bytes() if p.is_file() else None for p in sorted(Path(folder).rglob("*"))}


# ----------------------------------------------------------------------------- the output folder
@pytest.mark.parametrize("holds", ["metrics.jsonl", "checkpoints"])
def test_a_used_output_dir_is_refused_before_anything_is_written(tmp_path, holds):
    if holds == "metrics.jsonl":
        (tmp_path / "metrics.jsonl").write_text('{"iteration": 1}\n')
    else:
        (tmp_path / "checkpoints" / "iter_00002").mkdir(parents=True)
    before = snapshot(tmp_path)
    args = toy_args(tmp_path, resume=False, num_iterations=1, **TINY)
    with pytest.raises(UsageError, match="already holds a run") as e:
        check_output_dir(args)
    assert "--resume" in str(e.value) and "--output-dir" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UsageError, match="already holds a run"):  # the trainer asks before it loads anything
        train_grpo.main(args)
    assert snapshot(tmp_path) == before
    check_output_dir(replace(args, resume=True))  # --resume continues it


def test_an_output_dir_that_is_a_file_or_cannot_be_made_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        check_output_dir(toy_args(tmp_path / "file", resume=False))
    with pytest.raises(UsageError, match="cannot write"):  # its parent is a file
        check_output_dir(toy_args(tmp_path / "file" / "run", resume=False))
    check_output_dir(toy_args(tmp_path / "new" / "run", resume=False))
    assert (tmp_path / "new" / "run").is_dir() and not any((tmp_path / "new" / "run").iterdir())


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_an_unwritable_output_dir_is_refused(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o500)
    with pytest.raises(UsageError, match="cannot write"):
        check_output_dir(toy_args(tmp_path / "ro", resume=False))


# ----------------------------------------------------------------------------- unreadable checkpoints
def damage(ckpt: Path, how: str):
    weights = ckpt / "transformer" / "diffusion_pytorch_model.safetensors"
    target = weights if "safetensors" in how else ckpt / "trainer.pt"
    if "optimizer" in how:  # the one shard of a single process
        target = ckpt / "optimizer" / ("__0_0.distcp" if "shard" in how else ".metadata")
    if how.startswith("missing"):
        target.unlink()
    elif how.startswith("truncated"):
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    else:  # an object weights_only refuses to unpickle: a pickle could run any code
        state = torch.load(target, weights_only=True)
        torch.save({**state, "args": {**state["args"], "output_dir": Path("elsewhere")}}, target)


@pytest.mark.parametrize(
    "how",
    [
        "missing safetensors",
        "truncated safetensors",
        "missing trainer.pt",
        "truncated trainer.pt",
        "missing optimizer shard",
        "truncated optimizer shard",
        "missing optimizer metadata",
        "a pickled object in trainer.pt",
    ],
)
def test_resume_falls_back_past_an_unreadable_checkpoint(tmp_path, capsys, how):
    args = toy_args(tmp_path)
    saved = train_and_save(args)
    damage(tmp_path / "checkpoints" / "iter_00002", how)
    policy, optimizer = fresh(args)
    assert resume(policy, optimizer, args, rank=0) == 1
    assert all(torch.equal(v, saved[1][k]) for k, v in policy.state_dict().items())
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith("warning: unreadable checkpoint iter_00002 (")
    assert warning[0].endswith("resuming from iter_00001")
    # The resumed run's next save replaces the unreadable folder rather than failing on it.
    save_checkpoint(policy, optimizer, args, 2, rank=0)
    assert [p.name for p in checkpoints(tmp_path)] == ["iter_00001", "iter_00002"]
    assert resume(*fresh(args), args, rank=0) == 2


def test_no_readable_checkpoint_is_refused(tmp_path):
    args = toy_args(tmp_path)
    train_and_save(args)
    damage(tmp_path / "checkpoints" / "iter_00001", "truncated trainer.pt")
    damage(tmp_path / "checkpoints" / "iter_00002", "missing safetensors")
    with pytest.raises(UsageError, match="no readable checkpoint .*iter_00002 .*iter_00001") as e:
        resume(*fresh(args), args, rank=0)
    assert "\n" not in str(e.value)


def test_trainer_pt_loads_with_weights_only(tmp_path):
    args = toy_args(
        tmp_path, cls=train_chunk.ChunkArgs
    )  # tuples (reward, betas, chunk sizes), None, Literals
    train_and_save(args, iterations=1)
    state = torch.load(tmp_path / "checkpoints" / "iter_00001" / "trainer.pt", weights_only=True)
    assert state["args"] == {k: loadable(v) for k, v in asdict(args).items()} and state["iteration"] == 1
    assert state["args"]["adam_betas"] == (0.9, 0.999) and len(state["rng"]) == 1
    assert "optimizer" not in state  # AdamW's moments are in optimizer/, sharded


@pytest.mark.parametrize("layout", ["sharded", "whole in trainer.pt"])
def test_the_optimizer_resumes_bit_exactly(tmp_path, layout):
    """Both layouts: optimizer/ (one file per rank) and, as this file saved it before, one full state dict
    in trainer.pt."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    args = toy_args(tmp_path)
    policy, optimizer = fresh(args)
    for _ in range(3):
        policy(torch.randn(4, 3)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    save_checkpoint(policy, optimizer, args, 3, rank=0)
    ckpt = tmp_path / "checkpoints" / "iter_00003"
    if layout != "sharded":
        state = torch.load(ckpt / "trainer.pt", weights_only=True)
        whole = get_optimizer_state_dict(policy, optimizer, options=StateDictOptions(full_state_dict=True))
        torch.save({**state, "optimizer": whole}, ckpt / "trainer.pt")
        shutil.rmtree(ckpt / "optimizer")
    again, resumed = fresh(args)
    assert resume(again, resumed, args, rank=0) == 3
    ours, theirs = optimizer.state_dict()["state"], resumed.state_dict()["state"]
    assert ours.keys() == theirs.keys() and all(
        torch.equal(ours[i][k], theirs[i][k]) for i in ours for k in ("step", "exp_avg", "exp_avg_sq")
    )


def test_weights_saved_file_by_file_load_with_from_pretrained(tmp_path):
    from diffusers import FluxTransformer2DModel

    from plumbing.models import load_model

    policy = load_model("toy").transformer  # 4 MB of fp32 weights: five files of at most 1 MB
    save_weights(policy, tmp_path / "transformer", rank=0, max_shard_size="1MB")
    policy.save_config(tmp_path / "transformer")
    assert len(list((tmp_path / "transformer").glob("*.safetensors"))) > 1
    ours = policy.state_dict()
    for loaded in (
        FluxTransformer2DModel.from_pretrained(tmp_path / "transformer").state_dict(),
        read_weights(tmp_path),
    ):
        assert loaded.keys() == ours.keys() and all(torch.equal(loaded[k], ours[k]) for k in ours)


def shard_bytes(folder: Path) -> dict[str, int]:
    """The bytes each file of a sharded optimizer holds, from its metadata."""
    from torch.distributed.checkpoint import FileSystemReader

    held = {}
    for item in FileSystemReader(folder).read_metadata().storage_data.values():
        held[item.relative_path] = held.get(item.relative_path, 0) + item.length
    return held


def test_torchrun_shards_the_optimizer_and_resumes_bit_exactly(tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    flags = ["--num-iterations", "2", "--checkpoint-every", "1", "--image-every", "0", "--ema-decay", "0.5"]
    train("train_grpo.py", straight, *flags, nproc=2)
    ckpt = straight / "checkpoints" / "iter_00001"
    held = shard_bytes(ckpt / "optimizer")
    assert sorted(held) == ["__0_0.distcp", "__1_0.distcp"]  # one file per rank
    numel = sum(v.numel() for v in weights(ckpt / "transformer").values())
    assert sum(held.values()) >= 2 * 4 * numel  # AdamW's two fp32 moments of every weight, in all
    assert max(held.values()) < 0.6 * sum(held.values())  # and no rank wrote (or held) all of them
    shutil.copytree(ckpt, resumed / "checkpoints" / "iter_00001")
    (resumed / "metrics.jsonl").write_text(json.dumps(metrics(straight)[0]) + "\n")
    train("train_grpo.py", resumed, *flags, "--resume", nproc=2)
    for folder in ("transformer", "ema"):  # the weights, and their average: sharded as they are
        a, b = (weights(out / "checkpoints/iter_00002" / folder) for out in (straight, resumed))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for out in (straight, resumed):  # the optimizer's shards, gathered here into one file to compare
        dcp_to_torch_save(out / "checkpoints/iter_00002/optimizer", out / "optimizer.pt")
    a, b = (
        torch.load(out / "optimizer.pt", weights_only=False)["optimizer"]["state"]
        for out in (straight, resumed)
    )
    assert a.keys() == b.keys() and all(torch.equal(a[p][k], b[p][k]) for p in a for k in a[p])
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]  # noqa: E731
    assert strip(metrics(resumed)) == strip(metrics(straight))


# ----------------------------------------------------------------------------- the average of the weights
def steps_with_average(args, steps=3):
    """A policy, its optimizer and WeightAverage after `steps` AdamW steps; the weights at the start and after
    each step."""
    policy, optimizer = fresh(args)
    ema = WeightAverage(policy.parameters(), args.ema_decay)
    seen = [[p.detach().clone() for p in policy.parameters()]]
    for _ in range(steps):
        policy(torch.randn(4, 3)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update()
        seen.append([p.detach().clone() for p in policy.parameters()])
    return policy, optimizer, ema, seen


def test_the_average_is_the_closed_form_sum_and_swaps_in_and_out_exactly(tmp_path):
    """After n steps: d^n w_0 + (1 - d) sum_k d^(n - k) w_k, the starting weights w_0 included."""
    d, n = 0.8, 3
    policy, _, ema, seen = steps_with_average(toy_args(tmp_path, ema_decay=d), n)
    for i, average in enumerate(ema.average):
        expected = d**n * seen[0][i] + sum((1 - d) * d ** (n - k) * seen[k][i] for k in range(1, n + 1))
        torch.testing.assert_close(average, expected, rtol=1e-6, atol=1e-7)
    averages = [a.clone() for a in ema.average]
    with ema.swapped_in():
        assert all(torch.equal(p, a) for p, a in zip(policy.parameters(), averages, strict=True))
    assert all(torch.equal(p, w) for p, w in zip(policy.parameters(), seen[-1], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(ema.average, averages, strict=True))


def test_a_checkpoint_keeps_the_average_and_resume_restores_it_bit_exactly(tmp_path):
    args = toy_args(tmp_path, ema_decay=0.8)
    policy, optimizer, ema, seen = steps_with_average(args)
    save_checkpoint(policy, optimizer, args, 3, rank=0, ema=ema)
    saved = read_policy(tmp_path / "checkpoints" / "iter_00003" / "ema")
    names = [name for name, _ in policy.named_parameters()]
    assert all(torch.equal(saved[k], a) for k, a in zip(names, ema.average, strict=True))
    again, resumed = fresh(args)
    restored = WeightAverage(again.parameters(), args.ema_decay)  # holds the starting weights until resume
    assert resume(again, resumed, args, rank=0, ema=restored) == 3
    assert all(torch.equal(a, b) for a, b in zip(restored.average, ema.average, strict=True))
    assert all(torch.equal(p, w) for p, w in zip(again.parameters(), seen[-1], strict=True))


# ----------------------------------------------------------------------------- another run's checkpoint
def test_changed_run_flags_are_refused_with_the_differences(tmp_path):
    args = toy_args(tmp_path)
    train_and_save(args, iterations=1)
    with pytest.raises(UsageError, match="flags that change the run") as e:
        resume(*fresh(args), replace(args, seed=1, num_generations=16), rank=0)
    assert "--seed 0 -> 1" in str(e.value) and "--num-generations 8 -> 16" in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(UsageError, match=r"--ema-decay 0.0 -> 0.9"):  # it kept no average to resume
        resume(*fresh(args), replace(args, ema_decay=0.9), rank=0)
    chunk = toy_args(tmp_path, cls=train_chunk.ChunkArgs)  # train_chunk.py resuming a train_grpo.py run
    with pytest.raises(UsageError, match=r"--chunk-layout \(unset\) -> fixed"):
        resume(*fresh(args), chunk, rank=0)
    trainer = tmp_path / "checkpoints" / "iter_00001" / "trainer.pt"
    state = torch.load(trainer, weights_only=True)
    torch.save({**state, "rng": state["rng"] * 2}, trainer)  # as if saved by torchrun --nproc_per_node 2
    with pytest.raises(UsageError, match="world size 2 -> 1"):
        resume(*fresh(args), args, rank=0)
    torch.save(state, trainer)
    # Run length, logging, memory and device flags may change.
    free = dict(num_iterations=7, checkpoint_every=3, image_every=0, rollout_batch_size=4, device="auto")
    assert resume(*fresh(args), replace(args, **free), rank=0) == 1


def test_a_new_learning_rate_betas_and_weight_decay_are_applied(tmp_path, capsys):
    args = toy_args(tmp_path)
    train_and_save(args, iterations=1)
    policy, optimizer = fresh(args)
    retuned = replace(args, learning_rate=1e-3, adam_betas=(0.8, 0.9), weight_decay=0.5)
    assert resume(policy, optimizer, retuned, rank=0) == 1
    for group in optimizer.param_groups:
        assert (group["lr"], group["betas"], group["weight_decay"]) == (1e-3, (0.8, 0.9), 0.5)
    assert all(s["step"] == 1 for s in optimizer.state.values())  # the moments are the checkpoint's
    assert f"--learning-rate {args.learning_rate} -> 0.001" in capsys.readouterr().out


@pytest.mark.parametrize(
    "tiny,message",
    [
        (dict(width=4), r"key proj.weight of shape \[2, 3\], not \[2, 4\] \(1 in all\)"),
        (dict(name="head"), r"missing key head.weight \(2 in all\); unexpected key proj.bias \(2 in all\)"),
    ],
)
def test_weights_of_another_model_are_refused(tmp_path, tiny, message):
    args = toy_args(tmp_path)
    train_and_save(args, iterations=1)
    with pytest.raises(UsageError, match=message):
        resume(*fresh(args, **tiny), args, rank=0)


# ----------------------------------------------------------------------------- metrics.jsonl
def test_a_partial_last_metrics_line_is_dropped_and_the_rest_rewritten_atomically(tmp_path, capsys):
    rows = "".join(json.dumps({"iteration": i, "reward": 0.5}) + "\n" for i in (1, 2, 3))
    (tmp_path / "metrics.jsonl").write_text(rows + '{"iteration": 4, "rew')
    Logger(toy_args(tmp_path), start=2)
    assert (tmp_path / "metrics.jsonl").read_text() == rows.rsplit("{", 1)[0]  # iterations 1 and 2
    assert "dropped the partial last line" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temporary file left
    (tmp_path / "metrics.jsonl").write_text(rows.replace('{"iteration": 2', '{"iter'))
    with pytest.raises(UsageError, match="line 2 is not a metrics row"):
        Logger(toy_args(tmp_path), start=2)


def test_the_trainer_resumes_past_a_truncated_checkpoint(tmp_path, capsys):
    args = toy_args(tmp_path, resume=False, num_iterations=2, checkpoint_every=1, image_every=0, **TINY)
    train_grpo.main(args)
    # Cloned: safetensors maps the file into memory, and damage() truncates that file in place.
    straight = read_checkpoint(tmp_path / "checkpoints" / "iter_00002")[0]
    straight = {k: v.clone() for k, v in straight.items()}
    damage(tmp_path / "checkpoints" / "iter_00002", "truncated safetensors")
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 3, "rew')  # a run killed mid-write
    train_grpo.main(replace(args, resume=True))
    err = capsys.readouterr().err
    assert "resuming from iter_00001" in err and "dropped the partial last line" in err
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    redone = read_checkpoint(tmp_path / "checkpoints" / "iter_00002")[0]  # readable again, and bit-exact
    assert redone.keys() == straight.keys() and all(torch.equal(redone[k], straight[k]) for k in straight)
