"""chunking.py: L1rel against a loop, the prompt-spread statistics, layouts (hand-worked adaptive cases, the
curve fit against brute force), validation errors, weighted selection frequencies against exact
without-replacement probabilities, the CLI."""

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chunking import (
    Args,
    adaptive,
    chunk_bounds,
    chunk_means,
    curve,
    curve_stats,
    l1rel,
    main,
    make_layout,
    select_chunks,
    uniform,
    validate,
)
from plumbing.runtime import UsageError
from sampler import num_selected

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- L1rel
def test_l1rel_matches_a_loop():
    latents = torch.randn(3, 6, 4, 5, generator=torch.Generator().manual_seed(0))  # (N, T+1, L, C)
    got = l1rel(latents)
    assert got.shape == (3, 5)
    for n in range(3):
        for t in range(5):
            before, after = latents[n, t].flatten().tolist(), latents[n, t + 1].flatten().tolist()
            num = sum(abs(a - b) for a, b in zip(after, before, strict=True))
            den = sum(abs(b) for b in before)  # the state the transition starts from (the noisier one)
            assert got[n, t].item() == pytest.approx(num / den, rel=1e-5)


def test_l1rel_uses_the_state_before_the_step():
    latents = torch.stack([torch.full((2, 2), 4.0), torch.full((2, 2), 1.0)])[None]  # (1, 2, 2, 2): 4 -> 1
    assert l1rel(latents).item() == pytest.approx(3 / 4)  # |1 - 4| / |4|, not / |1|


def test_curve_stats_separate_the_prompt_from_the_noise():
    gen = torch.Generator().manual_seed(6)
    noise = torch.randn(400, 8, 3, generator=gen)  # (B, G, T)
    # Only the noise varies: the B per-prompt means spread by within / sqrt(G), which is all noise.
    stats = curve_stats(noise.reshape(400 * 8, 3), num_generations=8)
    torch.testing.assert_close(stats["within_prompt_std"], torch.ones(3), atol=0.05, rtol=0)
    assert (stats["between_prompt_std"] < 0.15).all()
    # A per-prompt offset of std 2 on top: between recovers it, within is unchanged.
    offsets = 2 * torch.randn(400, 1, 3, generator=gen)  # (B, 1, T)
    stats = curve_stats((noise + offsets).reshape(400 * 8, 3), num_generations=8)
    torch.testing.assert_close(stats["between_prompt_std"], offsets[:, 0].std(0), atol=0.1, rtol=0)
    torch.testing.assert_close(stats["within_prompt_std"], noise.var(1).mean(0).sqrt())
    torch.testing.assert_close(stats["mean"], (noise + offsets).mean((0, 1)))
    # G = 1 has no within-prompt spread to measure.
    assert curve_stats(noise[:, 0], num_generations=1)["within_prompt_std"].isnan().all()


# ----------------------------------------------------------------------------- layouts
def test_fixed_and_uniform():
    assert validate([2, 3, 4, 7], 16) == [2, 3, 4, 7]
    assert uniform(4, 16) == [4, 4, 4, 4]
    assert uniform(5, 16) == [5, 5, 5, 1]  # shorter last chunk
    assert uniform(1, 3) == [1, 1, 1]  # step level
    assert uniform(20, 16) == [16]  # sequence level


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("fixed", dict(sizes=[2, 3, 4, 7])),
        ("uniform", dict(size=3)),
        ("curve", dict(min_size=2)),
        ("curve", dict(min_size=3, num_chunks=5)),
        ("adaptive", dict(min_size=2)),
        ("adaptive", dict(min_size=3)),
    ],
)
def test_layouts_sum_to_T_and_respect_min_size(name, kwargs):
    gen = torch.Generator().manual_seed(1)
    for trial in range(20):
        c = torch.randn(16, generator=gen).cumsum(0) if trial % 2 else torch.rand(16, generator=gen)  # (16,)
        sizes = make_layout(name, 16, mean_curve=c, **kwargs)
        assert sum(sizes) == 16 and all(s >= kwargs.get("min_size", 1) for s in sizes)
        if name == "adaptive":  # a piece of 2m or more is always cut (docstring), so chunks stay below 2m
            assert all(s < 2 * kwargs["min_size"] for s in sizes)
        if name == "curve":
            assert len(sizes) == kwargs.get("num_chunks", 4)


def test_curve_is_the_least_squares_fit():
    # A step function is fitted exactly: three flat pieces.
    assert curve([10, 10, 5, 5, 5, 1, 1, 1], num_chunks=3) == [2, 3, 3]
    # Against brute force over every way to cut 9 steps into 3 chunks of at least 2.
    c = torch.rand(9, generator=torch.Generator().manual_seed(2)).double()

    def sse(sizes):
        return sum(((c[a:b] - c[a:b].mean()) ** 2).sum().item() for a, b in chunk_bounds(sizes))

    layouts = [
        [i, j - i, 9 - j] for i, j in itertools.combinations(range(1, 9), 2) if min(i, j - i, 9 - j) >= 2
    ]
    best = min(layouts, key=sse)
    assert sse(curve(c, num_chunks=3, min_size=2)) == pytest.approx(sse(best), abs=1e-12)
    # Ties (a flat curve: every layout costs 0) go to the earliest boundaries: minimal chunks first.
    assert curve([1.0] * 8, num_chunks=3, min_size=2) == [2, 2, 4]
    # A decaying curve with a flat tail gets small chunks first, one long chunk last.
    sizes = curve([0.5**t for t in range(16)], num_chunks=4)
    assert sizes[0] < sizes[-1] and sizes[-1] >= 8


def test_adaptive_hand_worked():
    # (a) Peak at step 2. Order 1: d = [4, 3, -2, -2, -1, -1, -.5, -.25, -.125]; the sign changes at d[2],
    # cut before step 2 + ceil(1/2) = 3 -> [0, 3) (3 < 2*2: final) and [3, 10). Order 2 on c[3:10]:
    # d2 = [1, 0, .5, .25, .125], no change -> midpoint 3 + 7//2 = 6 -> [3, 6) final, [6, 10). Order 3 on
    # c[6:10]: d3 = [-.125], no change -> midpoint 8. Layout [3, 3, 2, 2].
    assert adaptive([2, 6, 9, 7, 5, 4, 3, 2.5, 2.25, 2.125], min_size=2) == [3, 3, 2, 2]
    # (b) min_size 3 drops a cut. Order 1: d = [1, -2, -1, -1, -1, -1, 1, 1, 1, 1, 1], changes at d[1] (cut
    # at 2: leaves 2 < 3 steps, dropped) and d[6] (cut at 7). [7, 12) has 5 < 6 steps: final. Order 2 on
    # c[0:7]: d2 = [-3, 1, 0, 0, 0], change at d2[1] -> cut at 2, dropped again -> midpoint 3.
    # Layout [3, 4, 5].
    assert adaptive([5, 6, 4, 3, 2, 1, 0, 1, 2, 3, 4, 5], min_size=3) == [3, 4, 5]
    # (c) A monotone curve: order 1 never changes sign -> midpoint 7. Order 2 on c[0:7]:
    # d1 = [-1, -2, -3, -4, -3, -2], d2 = [-1, -1, -1, 1, 1] changes at d2[3] -> cut before 3 + ceil(2/2) = 4,
    # at the inflection. Order 2 on c[7:14]: d2 = [0, -.5, -.5, 0, .5] changes at d2[4] -> cut 12 leaves
    # 2 < 3, dropped -> midpoint 10. Layout [4, 3, 3, 4].
    assert adaptive([30, 29, 27, 24, 20, 17, 15, 14, 13.5, 13, 12, 10.5, 9, 8], min_size=3) == [4, 3, 3, 4]
    # (d) A plateau (zero difference) is skipped: d = [1, 0, -1, ...] changes at d[2] -> cut 3; order 2 on
    # c[3:8] is all zeros -> midpoint 5. Layout [3, 2, 3].
    assert adaptive([1, 2, 2, 1, 0, -1, -2, -3], min_size=2) == [3, 2, 3]
    assert adaptive([1, 2, 3], min_size=2) == [3]  # too short to cut into two chunks of 2


def test_chunk_helpers():
    assert chunk_bounds([2, 3, 4, 7]) == [(0, 2), (2, 5), (5, 9), (9, 16)]
    values = torch.arange(12.0).reshape(2, 6)  # (N, T)
    torch.testing.assert_close(chunk_means(values, [2, 1, 3]), torch.tensor([[0.5, 2, 4], [6.5, 8, 10]]))


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: validate([2, 3, 4], 16), "sum to 9 but there are 16"),
        (lambda: validate([2, 0, 14], 16), "positive"),
        (lambda: validate([4, -1, 13], 16), "positive"),
        (lambda: validate([2, 3, 4, 7], 17), "sum to 16 but there are 17"),
        (lambda: uniform(0, 16), "positive"),
        (lambda: make_layout("bogus", 16), "unknown chunk layout 'bogus'"),
        (lambda: make_layout("fixed", 16), "needs its chunk sizes"),
        (lambda: make_layout("curve", 16, mean_curve=[1.0] * 15), "L1rel curve of 16 steps .got one of 15"),
        (lambda: make_layout("adaptive", 16), "L1rel curve of 16 steps .got none"),
        (lambda: curve([1.0] * 7, num_chunks=4, min_size=2), "cannot cut 7 steps"),
        (lambda: select_chunks(torch.ones(2, 4), 0.5, method="bogus"), "unknown chunk selection"),
        (lambda: select_chunks(torch.ones(2, 4), 0.0), r"\(0, 1\]"),
        (lambda: select_chunks(-torch.ones(2, 4), 0.5), "non-negative"),
    ],
)
def test_validation_errors(call, match):
    with pytest.raises(UsageError, match=match):
        call()


# ----------------------------------------------------------------------------- weighted selection
def inclusion_probabilities(p, k):
    """Exact P(chunk j is among the k drawn), sequential draws without replacement, by enumerating every
    ordered draw: P(j1, ..., jk) = prod_i p_{j_i} / (1 - p_{j_1} - ... - p_{j_{i-1}})."""
    incl = [0.0] * len(p)
    for order in itertools.permutations(range(len(p)), k):
        prob, left = 1.0, 1.0
        for j in order:
            prob, left = prob * p[j] / left, left - p[j]
        for j in order:
            incl[j] += prob
    return incl


@pytest.mark.parametrize(
    "method, fraction", [("normalized", 0.5), ("normalized", 0.6), ("softmax", 0.5), ("uniform", 0.4)]
)
def test_selection_frequencies_match_exact_probabilities(method, fraction):
    rows = [[0.30, 0.15, 0.08, 0.05, 0.02], [1.0, 2.0, 0.5, 0.5, 3.0]]  # two trajectories' chunk mean L1rel
    draws = 20000
    weights = torch.tensor(rows).repeat_interleave(draws, 0)  # (2*draws, K)
    picked = select_chunks(weights, fraction, method=method, generator=torch.Generator().manual_seed(3))
    k = num_selected(5, fraction)
    assert picked.shape == (2 * draws, k) and picked.dtype == torch.long
    assert (picked.diff(dim=1) > 0).all()  # sorted and without repetition
    for r, w in enumerate(rows):
        if method == "normalized":
            p = [x / sum(w) for x in w]
        elif method == "softmax":
            p = [math.exp(x) / sum(math.exp(y) for y in w) for x in w]
        else:
            p = [1 / len(w)] * len(w)
        expected = inclusion_probabilities(p, k)
        freq = torch.bincount(picked[r * draws : (r + 1) * draws].flatten(), minlength=5).double() / draws
        for j in range(5):
            assert abs(freq[j].item() - expected[j]) < 0.02, (method, r, j, freq.tolist(), expected)


def test_selection_is_deterministic_and_uniform_accepts_no_weights():
    w = torch.rand(8, 4, generator=torch.Generator().manual_seed(4))
    a = select_chunks(w, 0.5, generator=torch.Generator().manual_seed(5))
    b = select_chunks(w, 0.5, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert select_chunks(None, 0.25, method="uniform", shape=(8, 4)).shape == (8, 1)  # max(1, int(4 * .25))
    assert num_selected(4, 0.1) == 1 and num_selected(4, 1.0) == 4 and num_selected(16, 0.5) == 8


# ----------------------------------------------------------------------------- the CLI
def run_cli(*flags):
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    command = [sys.executable, "chunking.py", *map(str, flags)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)


def check_report(out, output_dir, T, fixed_sizes):
    """The printed table and layouts, and the files the run wrote, agree with each other and with T."""
    assert out.returncode == 0, out.stderr
    lines = [" ".join(line.split()) for line in out.stdout.splitlines() if line.strip()]
    table = [line.split() for line in lines if line.split()[0].isdigit()]
    assert [int(r[0]) for r in table] == list(range(T))  # one row per trainable step
    assert all(float(r[2]) > 0 for r in table)  # a sampler moves the latent at every step
    record = json.loads((output_dir / "l1rel.json").read_text())  # what train_chunk.py --chunk-curve reads
    assert [float(r[2]) for r in table] == pytest.approx(
        record["mean"], abs=1e-4
    )  # the table prints the record
    assert record["layouts"]["fixed"] == fixed_sizes
    for name, sizes in record["layouts"].items():
        assert sum(sizes) == T
        assert any(line.startswith(f"{name} {sizes} P(first draw)") for line in lines)
    try:
        import matplotlib  # noqa: F401  (optional: without it the CLI says so and skips the plot)
    except ImportError:
        assert "pip install matplotlib" in out.stdout
    else:
        assert (output_dir / "chunks.png").stat().st_size > 0
    return record


def test_cli_on_a_tiny_flux_pipeline(tiny_flux_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\ntwo blue squares\n")
    output_dir = tmp_path / "new" / "chunking"  # created by the run
    flags = ["--model", tiny_flux_dir, "--prompts", prompts, "--height", 32, "--width", 32, "--num-steps", 7]
    flags += ["--num-generations", 2, "--sizes", 1, 2, 3, "--size", 2, "--num-chunks", 3, "--min-size", 1]
    out = run_cli(*flags, "--sde-mode", "dance", "--rollout-batch-size", 3, "--output-dir", output_dir)
    record = check_report(out, output_dir, 6, [1, 2, 3])
    assert (
        record["num_prompts"] == 2 and record["sde_mode"] == "dance"
    )  # the file's two prompts, blank skipped
    curve_layout = make_layout("curve", 6, mean_curve=record["mean"], num_chunks=3, min_size=1)
    assert curve_layout == record["layouts"]["curve"]


def test_cli_on_the_toy_bundle(tmp_path):
    if not (ROOT / "assets" / "toy" / "toy_config.json").exists():
        pytest.skip("the toy bundle is not built yet (python -m scripts.pretrain_toy)")
    flags = ["--num-prompts", 2, "--num-generations", 2, "--num-steps", 9, "--sizes", 1, 2, 5]
    record = check_report(run_cli(*flags, "--output-dir", tmp_path), tmp_path, 8, [1, 2, 5])
    assert record["prompts"] == "toy" and record["num_prompts"] == 2


def test_cli_user_errors_are_one_line(tmp_path):
    out = run_cli(
        "--num-steps", 7
    )  # the recipe's [2, 3, 4, 7] needs 16 trainable steps: fails before sampling
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("error: chunk sizes [2, 3, 4, 7]")
    with pytest.raises(UsageError, match="toy prompts fit only the toy model; pass --prompts FILE"):
        main(Args(model="some/flux"))
    with pytest.raises(UsageError, match="toy prompts fit only the toy model"):
        main(Args(model="some/flux", prompts="toy:train"))
    with pytest.raises(UsageError, match="prompts file 'no/such/prompts.txt' not found"):
        main(Args(model="some/flux", prompts="no/such/prompts.txt"))
    assert not list(tmp_path.iterdir())  # nothing was written
