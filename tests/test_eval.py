"""eval.py: seeded noise, hybrid inference at its limits, torchrun == one process, the toy breakdown, user
errors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eval import PRESETS, Args, hybrid_schedule, main, resolve_checkpoint, sample, score_images
from plumbing.models import load_model
from plumbing.runtime import cli, run
from plumbing.tables_and_figures import geneval_breakdown, summarize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red circle on the left", "two blue squares", "a photo of a cat"]
STEPS = 3


@pytest.fixture(scope="module")
def runs(tiny_flux_dir, tmp_path_factory):
    """Two "trained" checkpoints laid out as the trainers write them: `same` holds the base weights unchanged,
    `moved` perturbed ones. Plus a prompt file of three prompts (uneven over two ranks)."""
    from diffusers import FluxTransformer2DModel

    root = tmp_path_factory.mktemp("eval-runs")
    transformer = FluxTransformer2DModel.from_pretrained(tiny_flux_dir / "transformer")
    transformer.save_pretrained(root / "same" / "checkpoints" / "iter_00001" / "transformer")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in transformer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    transformer.save_pretrained(root / "moved" / "checkpoints" / "iter_00002" / "transformer")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return root


def flags(tiny_flux_dir, runs, out, *extra):
    return [
        "--model",
        str(tiny_flux_dir),
        "--prompts",
        str(runs / "prompts.txt"),
        "--reward",
        "jpeg_compressibility",
        "--num-steps",
        str(STEPS),
        "--height",
        "32",
        "--width",
        "32",
        "--prompts-per-batch",
        "2",
        "--device",
        "cpu",
        "--output-dir",
        str(out),
        *extra,
    ]


def elsewhere(argv, out, *extra):
    """The same evaluation written to another --output-dir."""
    i = argv.index("--output-dir") + 1
    return [*argv[:i], str(out), *argv[i + 1 :], *extra]


def scores_by_row(results):
    """{row label: [per-image score, ...] in prompt order}."""
    out = {}
    for r in results["images"]:
        out.setdefault(r["model"], []).append(r["scores"]["jpeg_compressibility"])
    return out


@pytest.fixture(scope="module")
def hybrid_run(tiny_flux_dir, runs, tmp_path_factory):
    """One evaluation of base vs the moved checkpoint with hybrid k = 0, all steps, and half of them."""
    out = tmp_path_factory.mktemp("eval-hybrid")
    argv = flags(
        tiny_flux_dir,
        runs,
        out,
        "--checkpoints",
        f"moved={runs / 'moved'}",
        "--hybrid-steps",
        "0",
        str(STEPS),
        "1",
    )
    main(cli(Args, PRESETS, argv))
    return argv, json.loads((out / "results.json").read_text())


# ----------------------------------------------------------------------------- 1. seeded, reproducible
def test_same_model_twice_and_against_itself_in_hybrid_mode_is_identical(
    hybrid_run, tiny_flux_dir, runs, tmp_path
):
    argv = flags(
        tiny_flux_dir, runs, tmp_path, "--checkpoints", f"self={runs / 'same'}", "--hybrid-steps", "1"
    )
    main(cli(Args, PRESETS, argv))
    results = json.loads((tmp_path / "results.json").read_text())
    base, plain, hybrid = scores_by_row(results).values()  # rows: base, self, self [hybrid 1/3]
    assert base == scores_by_row(hybrid_run[1])[str(tiny_flux_dir)]  # the base, evaluated a second time
    assert base == plain == hybrid  # same weights: the same images whichever transformer runs which step
    assert len(set(base)) > 1  # not vacuous: the prompts got different images
    assert (tmp_path / "grid.png").stat().st_size > 0 and "± " in (tmp_path / "table.md").read_text()


def test_a_prompts_noise_does_not_depend_on_its_batch(tiny_flux_dir):
    """Image j of prompt p is the same sampled in a batch of others or alone, and changes with the seed."""
    model = load_model(tiny_flux_dir, height=32, width=32)
    kw = dict(seed=3, num_generations=2, num_steps=STEPS, mode="flow", eta=0.7)
    batch = sample(model, [model.transformer] * STEPS, PROMPTS[1:], [5, 6], **kw)  # (4, 3, 32, 32)
    alone = sample(model, [model.transformer] * STEPS, PROMPTS[2:], [6], **kw)  # (2, 3, 32, 32)
    torch.testing.assert_close(batch[2:], alone, atol=1e-5, rtol=0)
    moved = sample(
        model, [model.transformer] * STEPS, PROMPTS[2:], [7], **kw
    )  # the same prompt at another index
    assert (moved - alone).abs().max() > 1e-2


# ----------------------------------------------------------------------------- 2. hybrid limits
def test_hybrid_with_zero_steps_is_the_base_and_with_all_steps_the_trained_model(hybrid_run, tiny_flux_dir):
    _, results = hybrid_run
    rows = scores_by_row(results)
    base, trained = rows[str(tiny_flux_dir)], rows["moved"]
    assert base != trained  # the checkpoint really differs from the base
    assert rows[f"moved [hybrid 0/{STEPS}]"] == base
    assert rows[f"moved [hybrid {STEPS}/{STEPS}]"] == trained
    assert rows[f"moved [hybrid 1/{STEPS}]"] not in (base, trained)
    assert hybrid_schedule("T", "B", 2, 4) == ["T", "T", "B", "B"]


# ----------------------------------------------------------------------------- 3. torchrun
def test_two_process_torchrun_equals_one_process(hybrid_run, tmp_path):
    argv, single = hybrid_run
    out = tmp_path / "dist"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "eval.py",
        *elsewhere(argv, out),
    ]
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 rank(s)" in proc.stdout
    both = json.loads((out / "results.json").read_text())
    assert both["images"] == single["images"]  # every image's score, bit for bit
    assert both["rows"] == single["rows"]


# ----------------------------------------------------------------------------- 4. toy breakdown
def test_ground_truth_toy_images_score_one_in_every_category():
    from plumbing import toy
    from rewards import build_reward

    prompts = toy.sample_prompts("heldout", 40, seed=0)
    assert {toy.category(p) for p in prompts} == set(toy.CATEGORIES)
    images = toy.render(prompts, seed=0)  # (N, 3, 32, 32), exactly what the prompts say
    scores = score_images(images, prompts, build_reward(["toy"]), toy_world=True)
    assert scores["toy"].min() == 1 and scores["strict"].min() == 1
    breakdown = geneval_breakdown(scores["strict"], [toy.category(p) for p in prompts])
    assert breakdown == {**{c: 1.0 for c in toy.CATEGORIES}, "overall": 1.0}
    wrong = score_images(
        images.roll(1, 0), prompts, build_reward(["toy"]), toy_world=True
    )  # every image misplaced
    assert geneval_breakdown(wrong["strict"], [toy.category(p) for p in prompts])["overall"] < 0.5


def test_toy_preset_end_to_end(tmp_path):
    if not (Path(ROOT) / "assets" / "toy" / "toy_config.json").exists():
        pytest.skip("the toy bundle is not built yet (python -m scripts.pretrain_toy)")
    main(
        cli(
            Args,
            PRESETS,
            [
                "--preset",
                "toy",
                "--num-prompts",
                "10",
                "--num-steps",
                "4",
                "--grid-prompts",
                "2",
                "--output-dir",
                str(tmp_path),
            ],
        )
    )
    results = json.loads((tmp_path / "results.json").read_text())
    (row,) = results["rows"]
    assert set(row["geneval"]) == {r["category"] for r in results["images"]} | {"overall"}
    assert 0 <= row["mean"]["toy"] <= 1
    assert "strict accuracy of the toy verifier by category" in (tmp_path / "table.md").read_text()


def test_summary_errors_are_over_prompts_and_the_difference_is_paired():
    scores = {
        0: lambda p, j: float(p + j),
        1: lambda p, j: float(p + j) + 0.1 * (p == 2),
    }  # row 1: base + 0.1 on p 2
    records = [
        {"row": m, "prompt_index": p, "generation": j, "scores": {"r": f(p, j)}}
        for m, f in scores.items()
        for p in range(3)
        for j in range(2)
    ]
    base, trained = summarize(records, ["base", "trained"], ["r"], P=3, G=2)
    assert base["mean"]["r"] == pytest.approx(1.5)  # per-prompt means 0.5, 1.5, 2.5
    assert base["se"]["r"] == pytest.approx(1.0 / 3**0.5)  # their std (1) over sqrt(3 prompts)
    assert trained["delta"]["r"] == pytest.approx(0.1 / 3)  # per-prompt differences 0, 0, 0.1
    assert trained["delta_se"]["r"] == pytest.approx(0.1 / 3**0.5 / 3**0.5)  # std 0.1/sqrt(3) over sqrt(3)
    assert base["delta"]["r"] == 0


# ----------------------------------------------------------------------------- 5. user errors
def one_line_error(capsys, argv):
    with pytest.raises(SystemExit) as e:
        run(main, Args, PRESETS, argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_bad_input_ends_with_one_clear_line(capsys, tiny_flux_dir, runs, tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    base = flags(tiny_flux_dir, runs, tmp_path / "out")
    err = one_line_error(capsys, base + ["--checkpoints", str(tmp_path / "no-such-run")])
    assert "no checkpoint at" in err and "no-such-run" in err
    err = one_line_error(capsys, base + ["--prompts", str(tmp_path / "empty.txt")])
    assert "has no prompts" in err
    err = one_line_error(capsys, base + ["--reward", "hpsv9"])
    assert "unknown reward 'hpsv9'" in err
    err = one_line_error(capsys, base + ["--checkpoints", str(runs / "moved"), "--hybrid-steps", "5"])
    assert f"--hybrid-steps 5 is outside 0..{STEPS}" in err
    assert not (tmp_path / "out").exists()  # every one failed before sampling


def test_checkpoint_forms(runs):
    folder = runs / "moved" / "checkpoints" / "iter_00002"
    assert resolve_checkpoint(str(folder)) == (str(folder), folder / "transformer")
    assert resolve_checkpoint(str(folder / "transformer"))[1] == folder / "transformer"
    assert resolve_checkpoint(str(runs / "moved")) == (f"{runs / 'moved'}/iter_00002", folder / "transformer")
    assert resolve_checkpoint(f"mine={runs / 'moved'}") == ("mine", folder / "transformer")


def test_a_checkpoint_with_an_average_of_the_weights_is_evaluated_with_it(runs, tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "iter_00002"
    shutil.copytree(runs / "moved" / "checkpoints" / "iter_00002", ckpt)
    shutil.copytree(ckpt / "transformer", ckpt / "ema")  # as --ema-decay saves it
    assert resolve_checkpoint(str(ckpt)) == (f"{ckpt} ema", ckpt / "ema")
    assert resolve_checkpoint(str(tmp_path / "run")) == (f"{tmp_path / 'run'}/iter_00002 ema", ckpt / "ema")
    assert resolve_checkpoint(f"mine={ckpt}") == ("mine", ckpt / "ema")
    assert resolve_checkpoint(str(ckpt / "transformer")) == (str(ckpt / "transformer"), ckpt / "transformer")
