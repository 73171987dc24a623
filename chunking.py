"""
The L1-dynamics chunker of Chunk-GRPO: L1rel curves, chunk layouts, weighted chunk selection.

    python chunking.py                          # toy model, 64 held-out prompts -> runs/chunking/
    python chunking.py --output-dir assets/toy  # rewrites the toy model's curve (for train_chunk.py) and plot
    python chunking.py --model black-forest-labs/FLUX.1-dev --device cuda --height 720 --width 720 \
        --prompts prompts.txt --output-dir runs/chunking-flux   # the same measurement on FLUX (1 GPU)

Each run writes l1rel.json (the curve train_chunk.py --chunk-curve reads) and chunks.png into --output-dir.
Chunk-GRPO (Luo et al. 2025, "Sample By Step, Optimize By Chunk", arXiv 2510.21583, published again as GCPO;
code: github.com/xingzhejun/GCPO) splits the T trainable steps of a trajectory into K contiguous chunks and
optimises each chunk as one action. Where to cut comes from the sampler's temporal dynamics, the relative L1
change of the latent per step, L1rel(t) = ||x_t - x_{t-1}||_1 / ||x_t||_1: it moves fast at high noise and is
flat over the tail, so the chunks are small first and long last. Under the SDE most of the early L1rel is the
injected noise (its std g sqrt(-dt) is largest near sigma = 1); under the ODE the toy curve *rises* instead,
so measure the curve with the sampler you train with (--sde-mode). A layout is a list of chunk sizes summing
to T, index 0 at the highest noise. Four ways to get one, each an importable function:
  fixed     given sizes (validate); the released FLUX recipe, [2, 3, 4, 7] over T = 16, picked by eye (v1).
  uniform   equal sizes, the last one shorter if the size does not divide T (ablations: [2x8], [4x4], [8, 8]).
  curve     ours: the K-piece least-squares fit of the mean curve, so that each chunk's steps move alike.
  adaptive  GCPO v3's rule, given in words without a threshold and not in its code: `adaptive` reads it.
Weighted sampling (GCPO's optional --chunk-weighted-sampling) picks which chunks of each trajectory to train
with probability proportional to the chunk's mean L1rel; only the selection changes, not the loss.
"""

import json
from dataclasses import asdict, dataclass
from itertools import pairwise
from pathlib import Path
from typing import Annotated

import torch

from plumbing.models import load_model
from plumbing.prompts import PromptSource
from plumbing.runtime import Range, UsageError, print0, resolve_device, run, writable_dir
from plumbing.tables_and_figures import plot_curve
from sampler import SamplingArgs, mode_defaults, num_selected, random_units, rollout, sampling_settings

RECIPE_SIZES = [2, 3, 4, 7]  # GCPO's released FLUX layout over T = 16 trainable steps (17 sampled)


@dataclass
class Args(SamplingArgs):  # the sampler measured: num_steps, shift, schedule, sde_mode, eta, device
    # --- model and prompts ---
    model: str = "toy"
    """hub id or local folder of a FLUX / SD3 pipeline, or `toy` for the bundled CPU model"""
    prompts: str = "toy"
    """text file with one prompt per line, or `toy` / `toy:heldout` / `toy:train` for the toy grammar (`toy`:
    the held-out split, prompts RL never trains on)"""
    num_prompts: Annotated[int, Range(">= 1")] = 64
    """prompts to measure: the first ones of the file or of the fixed toy list"""
    height: Annotated[int | None, Range("a positive multiple of 16")] = None
    """image height in pixels (FLUX / SD3 only)"""
    width: Annotated[int | None, Range("a positive multiple of 16")] = None
    """image width in pixels (FLUX / SD3 only)"""
    # --- sampling ---
    num_generations: Annotated[int, Range(">= 1")] = 4
    """trajectories per prompt; 2 or more measure the within-prompt spread (the prompt-invariance check)"""
    seed: Annotated[int, Range(">= 0")] = 0
    """seed of every trajectory's noise (the prompts are a fixed list)"""
    rollout_batch_size: Annotated[int | None, Range(">= 1")] = None
    """trajectories per transformer forward (memory only: results do not depend on it); default: all"""
    # --- layouts ---
    sizes: Annotated[tuple[int, ...], Range(">= 1")] = tuple(RECIPE_SIZES)
    """chunk sizes of the 'fixed' layout (must sum to num_steps - 1)"""
    size: Annotated[int, Range(">= 1")] = 4
    """chunk size of the 'uniform' layout"""
    num_chunks: Annotated[int, Range(">= 1")] = 4
    """chunks of the 'curve' layout"""
    min_size: Annotated[int, Range(">= 1")] = 2
    """minimum chunk size of the 'curve' and 'adaptive' layouts"""
    # --- output ---
    output_dir: str = "runs/chunking"
    """folder for l1rel.json (the curve, read by train_chunk.py --chunk-curve) and chunks.png (its plot)"""


# ----------------------------------------------------------------------------- the curve
def l1rel(latents: torch.Tensor) -> torch.Tensor:
    """Relative L1 change of each transition: latents (N, T+1, ...) -> (N, T).

    L1rel[:, t] = |latents[:, t+1] - latents[:, t]|_1 / |latents[:, t]|_1. The papers write
    ||x_t - x_{t-1}|| / ||x_t|| with time running *down* (x_t is noisier than x_{t-1}): the denominator is the
    state the transition starts from, here latents[:, t] (index 0 = sigma 1, pure noise).
    """
    x = latents.flatten(2).float()  # (N, T+1, D)
    return (x[:, 1:] - x[:, :-1]).abs().sum(-1) / x[:, :-1].abs().sum(-1)  # (N, T)


def curve_stats(rel: torch.Tensor, num_generations: int) -> dict[str, torch.Tensor]:
    """Per-step statistics of L1rel (B*G, T), rows prompt-major: name -> (T,), the names of l1rel.json.

    mean and std are over all trajectories. The prompt-invariance check is a one-way ANOVA per step: if the
    prompt did not matter, the B per-prompt means would spread by within_prompt_std / sqrt(G), and
    between_prompt_std estimates the spread the prompt itself adds. Both are nan when G = 1.
    """
    G, T = num_generations, rel.shape[1]
    per_prompt = rel.reshape(-1, G, T)  # (B, G, T)
    within = per_prompt.var(1).mean(0).sqrt() if G > 1 else torch.full((T,), float("nan"))  # (T,)
    between = (per_prompt.mean(1).var(0) - within**2 / G).clamp_min(0).sqrt()  # (T,)
    return dict(mean=rel.mean(0), std=rel.std(0), between_prompt_std=between, within_prompt_std=within)


# ----------------------------------------------------------------------------- layouts
def validate(sizes, T: int) -> list[int]:
    """Check a layout against T trainable steps: returns it as a list of ints or raises a clear UsageError."""
    sizes = list(sizes)
    if any(int(s) != s or s <= 0 for s in sizes):
        raise UsageError(f"chunk sizes must be positive whole numbers of steps, got {sizes}")
    sizes = [int(s) for s in sizes]
    if sum(sizes) != T:
        raise UsageError(
            f"chunk sizes {sizes} sum to {sum(sizes)} but there are {T} trainable steps; "
            f"give sizes that add up to {T} (the recipe's {RECIPE_SIZES} is for 16)"
        )
    return sizes


def uniform(size: int, T: int) -> list[int]:
    """Chunks of `size` steps from the high-noise end; a shorter last chunk when size does not divide T."""
    if size <= 0:
        raise UsageError(f"chunk size must be a positive number of steps, got {size}")
    size = min(size, T)  # size >= T is the sequence-level (GSPO-like) single chunk
    return validate([size] * (T // size) + ([T % size] if T % size else []), T)


def curve(mean_curve, num_chunks: int = 4, min_size: int = 1) -> list[int]:
    """The K-piece least-squares piecewise-constant fit of the curve, found exactly by dynamic programming.

    cost(i, j) = sum_{t in [i, j)} (c_t - mean_{[i, j)} c)^2 and the layout minimises sum_k cost(chunk k) over
    every split into `num_chunks` contiguous chunks of at least `min_size` steps (Bellman's segmented least
    squares; O(K T^2), nothing for T ~ 16). Deterministic: among equal costs the earliest boundary wins, so a
    perfectly flat curve gives minimal chunks first and the remainder last. K defaults to the recipe's 4.
    """
    c = torch.as_tensor(mean_curve, dtype=torch.float64).flatten()  # (T,)
    T = len(c)
    if num_chunks < 1 or min_size < 1 or num_chunks * min_size > T:
        raise UsageError(
            f"cannot cut {T} steps into {num_chunks} chunks of at least {min_size} steps; "
            f"lower the number of chunks or the minimum size"
        )
    s1 = torch.cat([c.new_zeros(1), c.cumsum(0)]).tolist()  # (T+1,) prefix sums, so cost(i, j) is O(1)
    s2 = torch.cat([c.new_zeros(1), (c * c).cumsum(0)]).tolist()  # (T+1,)

    def cost(i, j):
        return s2[j] - s2[i] - (s1[j] - s1[i]) ** 2 / (j - i)

    # best[k][j]: the least cost of the first j steps in k chunks; cut[k][j]: where the last chunk starts.
    best = [[float("inf")] * (T + 1) for _ in range(num_chunks + 1)]
    cut = [[0] * (T + 1) for _ in range(num_chunks + 1)]
    best[0][0] = 0.0
    for k in range(1, num_chunks + 1):
        for j in range(k * min_size, T + 1):
            for i in range((k - 1) * min_size, j - min_size + 1):
                total = best[k - 1][i] + cost(i, j)
                if total < best[k][j] - 1e-12:  # strict (with float slack): the earliest boundary wins ties
                    best[k][j], cut[k][j] = total, i
    bounds = [T]  # walk the cuts back from the end: bounds = [0, end of chunk 1, ..., T]
    for k in range(num_chunks, 0, -1):
        bounds.insert(0, cut[k][bounds[0]])
    return validate([b - a for a, b in pairwise(bounds)], T)


def adaptive(mean_curve, min_size: int = 2) -> list[int]:
    """GCPO v3's rule: cut where the curve's derivative changes sign, at the midpoint where it never does, and
    recurse into each piece with the next-higher derivative, until no piece can be cut into two of `min_size`.

    The paper gives the rule in words and no threshold; this is the exact reading implemented (and tested):
    - A piece of n < 2 * min_size steps is final. Otherwise take the order-k finite difference d = diff^k of
      the curve on the piece (k = 1 on the whole curve, k + 1 one level down).
    - A sign change is between consecutive nonzero entries of d (zeros, exact plateaus, are skipped). When the
      new sign starts at d[q] the cut goes before step q + ceil(k / 2): for k = 1 the turning point (a peak or
      a valley) closes the chunk before the cut; for k = 2 the cut falls at the inflection, and so on.
    - Cuts are kept left to right when both sides keep at least `min_size` steps; if none is left, cut at the
      midpoint n // 2 of the piece.
    Since a piece of 2 * min_size or more is always cut, every chunk ends with min_size to 2 * min_size - 1
    steps: the rule decides where the boundaries sit, not how long chunks grow (use `curve` for a long tail).
    """
    c = torch.as_tensor(mean_curve, dtype=torch.float64).flatten()  # (T,)
    if min_size < 1:
        raise UsageError(f"the minimum chunk size must be at least 1 step, got {min_size}")

    def split(lo, hi, k):
        n = hi - lo
        if n < 2 * min_size:
            return [n]
        sign = torch.sign(torch.diff(c[lo:hi], n=k)).tolist() if n > k else []  # (n - k,)
        nonzero = [q for q, s in enumerate(sign) if s != 0]
        changes = [q for p, q in pairwise(nonzero) if sign[p] != sign[q]]
        cuts, last = [], lo
        for q in changes:
            b = lo + q + (k + 1) // 2  # the first step after the change (see the docstring)
            if b - last >= min_size and hi - b >= min_size:
                cuts.append(b)
                last = b
        if not cuts:
            cuts = [lo + n // 2]
        edges = [lo] + cuts + [hi]
        return [m for a, b in pairwise(edges) for m in split(a, b, k + 1)]

    return validate(split(0, len(c), 1), len(c))


LAYOUTS = ("fixed", "uniform", "curve", "adaptive")  # fixed: given sizes, checked by validate


def make_layout(name: str, T: int, *, sizes=None, size=None, mean_curve=None, num_chunks=4, min_size=None):
    """One entry point for scripts: the layout `name` over T trainable steps, as a validated list of sizes."""
    if name not in LAYOUTS:
        raise UsageError(f"unknown chunk layout {name!r}; choose one of {', '.join(LAYOUTS)}")
    if name == "fixed":
        if sizes is None:
            raise UsageError("the 'fixed' chunk layout needs its chunk sizes, e.g. 2 3 4 7 for 16 steps")
        return validate(sizes, T)
    if name == "uniform":
        if size is None:
            raise UsageError("the 'uniform' chunk layout needs a chunk size, e.g. 4")
        return uniform(size, T)
    if mean_curve is None or len(mean_curve) != T:
        got = "none" if mean_curve is None else f"one of {len(mean_curve)}"
        raise UsageError(
            f"the {name!r} chunk layout needs a measured L1rel curve of {T} steps (got {got}); write one "
            f"with `python chunking.py --num-steps {T + 1} --output-dir DIR` (DIR/l1rel.json), or use "
            f"'fixed' or 'uniform'"
        )
    if name == "curve":
        return curve(mean_curve, num_chunks, 1 if min_size is None else min_size)
    return adaptive(mean_curve, 2 if min_size is None else min_size)


def chunk_bounds(sizes) -> list[tuple[int, int]]:
    """[(start, end)] step ranges of each chunk, end exclusive: [2, 3] -> [(0, 2), (2, 5)]."""
    ends = torch.tensor(list(sizes)).cumsum(0).tolist()
    return [(e - s, e) for s, e in zip(sizes, ends, strict=True)]


def chunk_means(values: torch.Tensor, sizes) -> torch.Tensor:
    """Mean of per-step values over each chunk: values (N, T) -> (N, K) (e.g. each chunk's mean L1rel)."""
    return torch.stack([values[:, a:b].mean(1) for a, b in chunk_bounds(sizes)], 1)  # (N, K)


# ----------------------------------------------------------------------------- selection
SELECTION_METHODS = ("normalized", "softmax", "uniform")


def select_chunks(weights, fraction: float, *, method="normalized", generator=None, shape=None):
    """Which chunks each trajectory trains: k = max(1, int(K * fraction)) distinct chunk ids per row, (N, k)
    long, sorted ascending (high noise first).

    weights (N, K) >= 0, usually chunk_means(l1rel, sizes). Draws are without replacement and sequential, each
    chunk with probability proportional to its weight among those not yet drawn (torch.multinomial):
      normalized  p_j = w_j / sum_i w_i   (GCPO's weighted sampling: P(chunk j) ∝ mean L1rel of chunk j)
      softmax     p_j = exp(w_j) / sum_i exp(w_i)   (the paper's alternative; with L1rel values << 1 it is
                  close to uniform, since exp is nearly linear there)
      uniform     equal weights (GCPO's default), random_units as train_grpo's steps; or shape=(N, K).
    `generator` must live on the weights' device; the same generator state gives the same selection.
    """
    if method not in SELECTION_METHODS:
        raise UsageError(f"unknown chunk selection {method!r}; choose one of {', '.join(SELECTION_METHODS)}")
    if weights is None:
        if method != "uniform" or shape is None:
            raise UsageError("select_chunks needs weights (N, K), or method='uniform' with shape=(N, K)")
        weights = torch.ones(shape)
    w = weights.detach().float()  # (N, K)
    if method == "uniform":  # the draws of step-level GRPO: chunks of size 1 pick the same steps
        return random_units(len(w), w.shape[1], fraction, generator, w.device).sort(1).values
    if method == "softmax":
        p = torch.softmax(w, dim=1)  # (N, K)
    else:
        if (w < 0).any() or not torch.isfinite(w).all():
            raise UsageError("chunk weights must be finite and non-negative (each a chunk's mean L1rel)")
        p = w / w.sum(1, keepdim=True)  # (N, K)
    picked = torch.multinomial(p, num_selected(w.shape[1], fraction), replacement=False, generator=generator)
    return picked.sort(1).values


# ----------------------------------------------------------------------------- measuring a model's curve
def main(args: Args):
    args = mode_defaults(args)  # eta of the --sde-mode's recipe unless given
    T = args.num_steps - 1
    validate(args.sizes, T)  # fail before sampling, not after
    source = PromptSource(args.prompts, toy_split="heldout")
    if source.is_toy and args.model != "toy" and not Path(args.model, "toy_config.json").exists():
        raise UsageError("toy prompts fit only the toy model; pass --prompts FILE (one prompt per line)")
    prompts = source.head(args.num_prompts)
    device = resolve_device(args.device)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = load_model(args.model, device=device, height=args.height, width=args.width, dtype=dtype)
    out = writable_dir(args.output_dir)
    G, batch_size = args.num_generations, args.rollout_batch_size
    sampling = sampling_settings(args, model)
    traj = rollout(model, prompts, num_generations=G, seed=args.seed, batch_size=batch_size, **sampling)
    rel = l1rel(traj.latents).cpu()  # (N, T)
    stats = curve_stats(rel, args.num_generations)  # name -> (T,)
    sigmas, setting = traj.sigmas[:T].tolist(), f"{args.sde_mode} eta {args.eta:g}, shift {args.shift:g}"
    print0(f"L1rel of {args.model} ({setting}), {len(prompts)} prompts x {G} trajectories")
    print0(" step  sigma" + "".join(f"{name:>19}" for name in stats))
    for t in range(T):
        print0(f"{t:5d} {sigmas[t]:6.3f}" + "".join(f"{v[t]:19.4f}" for v in stats.values()))
    between, within = stats["between_prompt_std"] ** 2, stats["within_prompt_std"] ** 2  # (T,) variances
    share = (between / (between + within)).mean().item()  # nan with G = 1
    print0(f"share of the per-step variance due to the prompt (mean over steps; needs G >= 2): {share:.1%}")
    mean = stats["mean"]
    layouts = {
        "fixed": make_layout("fixed", T, sizes=args.sizes),
        "uniform": make_layout("uniform", T, size=args.size),
        "curve": make_layout("curve", T, mean_curve=mean, num_chunks=args.num_chunks, min_size=args.min_size),
        "adaptive": make_layout("adaptive", T, mean_curve=mean, min_size=args.min_size),
    }
    for name, sizes in layouts.items():
        w = chunk_means(rel, sizes)  # (N, K)
        p = (w / w.sum(1, keepdim=True)).mean(0).tolist()  # each chunk's first-draw probability, averaged
        print0(f"{name:>9} {sizes!s:<28} P(first draw) = [{', '.join(f'{x:.2f}' for x in p)}]")
    # The record keeps every flag it was measured with; num_prompts is the count used (a file may be shorter).
    record = asdict(args) | {"num_prompts": len(prompts), "sigmas": sigmas, "layouts": layouts}
    record |= {name: v.tolist() for name, v in stats.items()}
    (out / "l1rel.json").write_text(json.dumps(record, indent=1))
    print0(f"wrote {out / 'l1rel.json'}")
    plot_curve(out / "chunks.png", mean, stats["std"], layouts)


if __name__ == "__main__":
    run(main, Args)
