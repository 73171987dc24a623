"""
The L1-dynamics chunker of Chunk-GRPO / GCPO: L1rel curves, chunk layouts, weighted chunk selection.

    python chunking.py                                      # toy model, 64 prompts: curve, layouts, chunks.png
    python chunking.py --model black-forest-labs/FLUX.1-dev --device cuda --height 720 --width 720 \
        --prompts-file prompts.txt --num-prompts 64         # the same measurement on FLUX (1 GPU)

Chunk-GRPO (../shared/PAPERS.md section 4) splits the T trainable steps of a trajectory into K contiguous chunks
and optimises each chunk as one action. Where to cut comes from the sampler's temporal dynamics, the relative L1
change of the latent per step, L1rel(t) = ||x_t - x_{t-1}||_1 / ||x_t||_1: it moves fast at high noise and is flat
over the tail, so the chunks are small first and long last. Under the SDE most of the early L1rel is the injected
noise (its std g sqrt(-dt) is largest near sigma = 1); under the ODE the toy curve *rises* instead, so measure the
curve with the sampler you train with. A layout is a list of chunk sizes summing to T, index 0 at the highest
noise. Four ways to get one, each an importable function:
  fixed    given sizes; the released FLUX recipe is [2, 3, 4, 7] over 16 trainable steps, picked by eye (v1).
  uniform  equal sizes c, the last chunk shorter when c does not divide T (the paper's [2x8], [4x4], [8, 8] ablations).
  curve    ours: the K-piece piecewise-constant least-squares fit of the measured mean curve (exact, by dynamic
           programming). A chunk shares one ratio and one clip, so its steps should have alike dynamics; the fit
           makes each chunk as homogeneous in L1rel as K chunks allow, which needs short chunks where the curve
           moves and costs nothing for one long chunk over a flat tail.
  adaptive GCPO v3's rule, which the paper describes without a threshold and its code does not implement (see
           `adaptive` for the exact reading made here).
Weighted sampling (GCPO's optional --chunk-weighted-sampling) picks which chunks of each trajectory to train with
probability proportional to the chunk's mean L1rel; only the selection changes, the loss is not reweighted.
"""
import json
from dataclasses import dataclass
from pathlib import Path

import torch

import sampler
from sampler import UsageError

RECIPE_SIZES = [2, 3, 4, 7]  # GCPO's released FLUX layout over T = 16 trainable steps (17 sampled)


# ----------------------------------------------------------------------------- the curve
def l1rel(latents: torch.Tensor) -> torch.Tensor:
    """Relative L1 change of each transition: latents (N, T+1, ...) -> (N, T).

    L1rel[:, t] = |latents[:, t+1] - latents[:, t]|_1 / |latents[:, t]|_1. The papers write ||x_t - x_{t-1}|| / ||x_t||
    with time running *down* (x_t is noisier than x_{t-1}), so x_t is the state before the step: the denominator is
    the state the transition starts from, here latents[:, t] (index 0 = sigma 1, pure noise).
    """
    x = latents.flatten(2).float()  # (N, T+1, D)
    return (x[:, 1:] - x[:, :-1]).abs().sum(-1) / x[:, :-1].abs().sum(-1)  # (N, T)


# ----------------------------------------------------------------------------- layouts
def validate(sizes, T: int) -> list[int]:
    """Check a layout against T trainable steps; returns it as a list of ints or raises one clear UsageError."""
    sizes = list(sizes)
    if any(int(s) != s or s <= 0 for s in sizes):
        raise UsageError(f"chunk sizes must be positive whole numbers of steps, got {sizes}")
    sizes = [int(s) for s in sizes]
    if sum(sizes) != T:
        raise UsageError(f"chunk sizes {sizes} sum to {sum(sizes)} but there are {T} trainable steps; "
                         f"give sizes that add up to {T} (the recipe's {RECIPE_SIZES} is for 16)")
    return sizes


def fixed(sizes, T: int) -> list[int]:
    """The given sizes, checked (the FLUX recipe: [2, 3, 4, 7] with T = 16)."""
    return validate(sizes, T)


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
        raise UsageError(f"cannot cut {T} steps into {num_chunks} chunks of at least {min_size} steps; "
                         f"lower the number of chunks or the minimum size")
    s1 = torch.cat([c.new_zeros(1), c.cumsum(0)]).tolist()  # (T+1,) prefix sums, so cost(i, j) is O(1)
    s2 = torch.cat([c.new_zeros(1), (c * c).cumsum(0)]).tolist()  # (T+1,)

    def cost(i, j):
        return s2[j] - s2[i] - (s1[j] - s1[i]) ** 2 / (j - i)

    inf = float("inf")
    # best[k][j]: least cost of cutting the first j steps into k chunks; cut[k][j]: where its last chunk starts.
    best = [[inf] * (T + 1) for _ in range(num_chunks + 1)]
    cut = [[0] * (T + 1) for _ in range(num_chunks + 1)]
    best[0][0] = 0.0
    for k in range(1, num_chunks + 1):
        for j in range(k * min_size, T + 1):
            for i in range((k - 1) * min_size, j - min_size + 1):
                total = best[k - 1][i] + cost(i, j)
                if total < best[k][j] - 1e-12:  # strict (with float slack): the earliest boundary wins ties
                    best[k][j], cut[k][j] = total, i
    ends, j = [], T
    for k in range(num_chunks, 0, -1):
        ends.append(j)
        j = cut[k][j]
    bounds = [0] + ends[::-1]
    return validate([b - a for a, b in zip(bounds, bounds[1:])], T)


def adaptive(mean_curve, min_size: int = 2) -> list[int]:
    """GCPO v3's rule: cut where the curve's derivative changes sign, at the midpoint where it never does, and
    recurse into each piece with the next-higher derivative, until no piece can be cut into two of `min_size`.

    The paper gives the rule in words and no threshold; this is the exact reading implemented (and tested):
    - A piece of n < 2 * min_size steps is final. Otherwise take the order-k finite difference d = diff^k of the
      curve on the piece (k = 1 on the whole curve, k + 1 one level down).
    - A sign change is between consecutive nonzero entries of d (zeros, exact plateaus, are skipped). When the
      new sign starts at d[q] the cut goes before step q + ceil(k / 2): for k = 1 the turning point (a peak or a
      valley) closes the chunk before the cut; for k = 2 the cut falls at the inflection, and so on.
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
        changes = [q for p, q in zip(nonzero, nonzero[1:]) if sign[p] != sign[q]]
        cuts, last = [], lo
        for q in changes:
            b = lo + q + (k + 1) // 2  # the first step after the change (see the docstring)
            if b - last >= min_size and hi - b >= min_size:
                cuts.append(b)
                last = b
        if not cuts:
            cuts = [lo + n // 2]
        edges = [lo] + cuts + [hi]
        return [m for a, b in zip(edges, edges[1:]) for m in split(a, b, k + 1)]

    return validate(split(0, len(c), 1), len(c))


LAYOUTS = {"fixed": fixed, "uniform": uniform, "curve": curve, "adaptive": adaptive}


def make_layout(name: str, T: int, *, sizes=None, size=None, mean_curve=None, num_chunks=4, min_size=None):
    """One entry point for scripts: the layout `name` over T trainable steps, as a validated list of sizes."""
    if name not in LAYOUTS:
        raise UsageError(f"unknown chunk layout {name!r}; choose one of {', '.join(LAYOUTS)}")
    if name == "fixed":
        if sizes is None:
            raise UsageError("the 'fixed' chunk layout needs its chunk sizes, e.g. 2 3 4 7 for 16 steps")
        return fixed(sizes, T)
    if name == "uniform":
        if size is None:
            raise UsageError("the 'uniform' chunk layout needs a chunk size, e.g. 4")
        return uniform(size, T)
    if mean_curve is None or len(mean_curve) != T:
        got = "none" if mean_curve is None else f"one of {len(mean_curve)}"
        raise UsageError(f"the {name!r} chunk layout needs a measured L1rel curve of {T} steps (got {got}); measure "
                         f"one with `python chunking.py --num-steps {T + 1} --save FILE`, or use 'fixed' or 'uniform'")
    if name == "curve":
        return curve(mean_curve, num_chunks, 1 if min_size is None else min_size)
    return adaptive(mean_curve, 2 if min_size is None else min_size)


def chunk_bounds(sizes) -> list[tuple[int, int]]:
    """[(start, end)] step ranges of each chunk, end exclusive: [2, 3] -> [(0, 2), (2, 5)]."""
    ends = torch.tensor(list(sizes)).cumsum(0).tolist()
    return [(e - s, e) for s, e in zip(sizes, ends)]


def chunk_means(values: torch.Tensor, sizes) -> torch.Tensor:
    """Mean of per-step values over each chunk: values (N, T) -> (N, K) (e.g. each chunk's mean L1rel)."""
    return torch.stack([values[:, a:b].mean(1) for a, b in chunk_bounds(sizes)], 1)  # (N, K)


# ----------------------------------------------------------------------------- selection
SELECTION_METHODS = ("normalized", "softmax", "uniform")


def num_selected(num_chunks: int, fraction: float) -> int:
    """How many chunks a trajectory trains: max(1, int(K * fraction)) (2 of 4 in GCPO's recipe)."""
    if not 0 < fraction <= 1:
        raise UsageError(f"the fraction of chunks to train must be in (0, 1], got {fraction}")
    return max(1, int(num_chunks * fraction))


def select_chunks(weights, fraction: float, *, method="normalized", generator=None, shape=None) -> torch.Tensor:
    """Which chunks each trajectory trains: k = max(1, int(K * fraction)) distinct chunk ids per row, (N, k) long,
    sorted ascending (high noise first).

    weights (N, K) >= 0, usually chunk_means(l1rel, sizes). Draws are without replacement and sequential, each
    chunk with probability proportional to its weight among those not yet drawn (torch.multinomial):
      normalized  p_j = w_j / sum_i w_i   (GCPO's weighted sampling: P(chunk j) ∝ mean L1rel of chunk j)
      softmax     p_j = exp(w_j) / sum_i exp(w_i)   (the paper's alternative; with L1rel values << 1 it is close
                  to uniform, since exp is nearly linear there)
      uniform     equal weights (GCPO without --chunk-weighted-sampling); weights may be None, with shape=(N, K).
    `generator` must live on the weights' device; the same generator state gives the same selection.
    """
    if method not in SELECTION_METHODS:
        raise UsageError(f"unknown chunk selection {method!r}; choose one of {', '.join(SELECTION_METHODS)}")
    if weights is None:
        if method != "uniform" or shape is None:
            raise UsageError("select_chunks needs weights (N, K), or method='uniform' with shape=(N, K)")
        weights = torch.ones(shape)
    w = weights.detach().float()  # (N, K)
    k = num_selected(w.shape[1], fraction)
    if method == "uniform":
        p = torch.ones_like(w)  # (N, K)
    elif method == "softmax":
        p = torch.softmax(w, dim=1)  # (N, K)
    else:
        if (w < 0).any() or not torch.isfinite(w).all():
            raise UsageError("normalized chunk weights must be finite and non-negative (mean L1rel per chunk)")
        p = w / w.sum(1, keepdim=True)  # (N, K)
    picked = torch.multinomial(p, k, replacement=False, generator=generator)  # (N, k)
    return picked.sort(1).values


# ----------------------------------------------------------------------------- measuring a model's curve
@dataclass
class Args:
    model: str = "toy"
    """hub id or local folder of a FLUX / SD3 pipeline, or "toy" for the bundled CPU model"""
    prompts_file: str | None = None
    """text file, one prompt a line (default for the toy model: held-out prompts drawn from its grammar)"""
    num_prompts: int = 64
    """prompts to sample (the first ones of the file)"""
    num_generations: int = 4
    """trajectories per prompt; 2 or more measure the within-prompt spread the prompt-invariance check needs"""
    num_steps: int = 17
    """denoising steps; T = num_steps - 1 trainable transitions are measured"""
    shift: float = 3.0
    """resolution shift of the sigma schedule"""
    mode: str = "flow"
    """SDE of the rollout: flow | dance | cps | ode"""
    eta: float = 0.7
    """noise level of the SDE"""
    seed: int = 0
    """seed of the prompts and of every trajectory's noise"""
    sizes: tuple[int, ...] = tuple(RECIPE_SIZES)
    """chunk sizes of the 'fixed' layout (must sum to num_steps - 1)"""
    size: int = 4
    """chunk size of the 'uniform' layout"""
    num_chunks: int = 4
    """chunks of the 'curve' layout"""
    min_size: int = 2
    """minimum chunk size of the 'curve' and 'adaptive' layouts"""
    device: str = "cpu"
    """cpu or cuda"""
    height: int | None = None
    """image height in pixels (FLUX / SD3 only)"""
    width: int | None = None
    """image width in pixels (FLUX / SD3 only)"""
    batch_size: int | None = None
    """trajectories per transformer call (default: all at once)"""
    out: str = "chunks.png"
    """where to write the plot of the curve with each layout's boundaries ("" for none)"""
    save: str | None = None
    """also write the curve as JSON (per-step mean, std, sigmas, layouts) for train_chunk.py --chunk-curve"""


def load_prompts(args: Args) -> list[str]:
    if args.prompts_file:
        if not Path(args.prompts_file).is_file():
            raise UsageError(f"--prompts-file {args.prompts_file!r} is not a file; give a text file, one prompt a line")
        lines = Path(args.prompts_file).read_text(encoding="utf-8").splitlines()
        return [s.strip() for s in lines if s.strip()][:args.num_prompts]
    if args.model != "toy" and not (Path(args.model) / "toy_config.json").exists():
        raise UsageError(f"give prompts for {args.model!r} with --prompts-file (one prompt a line)")
    import toy
    return toy.sample_prompts("heldout", args.num_prompts, args.seed)  # prompts RL never trains on


def plot(path, mean, std, layouts):
    """The mean curve with a +-1 std band, one panel per layout, its chunk boundaries as dashed lines."""
    try:
        import matplotlib
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install matplotlib)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(layouts), 1, figsize=(7, 1.8 * len(layouts)), sharex=True, squeeze=False)
    steps = torch.arange(len(mean)).numpy()
    for ax, (name, sizes) in zip(axes[:, 0], layouts.items()):
        ax.plot(steps, mean.numpy(), "o-", ms=3)
        ax.fill_between(steps, (mean - std).numpy(), (mean + std).numpy(), alpha=0.25)
        for _, end in chunk_bounds(sizes)[:-1]:
            ax.axvline(end - 0.5, color="k", ls="--", lw=1)
        ax.set_ylabel("L1rel")
        ax.set_title(f"{name}: {sizes}", fontsize=9)
    axes[-1, 0].set_xlabel("step t (0 = highest noise)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot -> {path}")


def main(args: Args):
    validate(args.sizes, args.num_steps - 1)  # fail before sampling, not after
    prompts = load_prompts(args)
    model = sampler.load_model(args.model, device=args.device, height=args.height, width=args.width,
                               dtype=torch.float32 if args.device == "cpu" else torch.bfloat16)
    traj = sampler.rollout(model, prompts, num_generations=args.num_generations, num_steps=args.num_steps,
                           shift=args.shift, mode=args.mode, eta=args.eta, seed=args.seed,
                           batch_size=args.batch_size, progress=True)
    rel = l1rel(traj.latents).cpu()  # (N, T)
    B, G, T = len(prompts), args.num_generations, rel.shape[1]
    mean, std = rel.mean(0), rel.std(0)  # (T,), (T,)
    # Prompt invariance, one-way ANOVA per step: if the prompt did not matter, the spread of the B per-prompt means
    # would be the within-prompt spread / sqrt(G). `between` estimates the spread that the prompt itself adds.
    per_prompt = rel.reshape(B, G, T)
    within = per_prompt.var(1).mean(0).sqrt() if G > 1 else torch.full((T,), float("nan"))  # (T,)
    between = (per_prompt.mean(1).var(0) - within**2 / G).clamp_min(0).sqrt()  # (T,)
    print(f"L1rel of {args.model}: {B} prompts x {G} trajectories, {args.num_steps} steps shift {args.shift:g}, "
          f"{args.mode} eta {args.eta:g}")
    print(" step  sigma    mean     std   between-prompt  within-prompt")
    for t in range(T):
        print(f"{t:5d} {traj.sigmas[t].item():6.3f} {mean[t]:7.4f} {std[t]:7.4f} {between[t]:12.4f} "
              f"{within[t]:14.4f}")
    share = (between**2 / (between**2 + within**2)).mean().item()  # nan with G = 1: no within-prompt spread
    print(f"share of the per-step variance due to the prompt (mean over steps): {share:.1%}"
          + ("" if G > 1 else " (needs --num-generations 2 or more)"))
    layouts = {"fixed": make_layout("fixed", T, sizes=args.sizes),
               "uniform": make_layout("uniform", T, size=args.size),
               "curve": make_layout("curve", T, mean_curve=mean, num_chunks=args.num_chunks, min_size=args.min_size),
               "adaptive": make_layout("adaptive", T, mean_curve=mean, min_size=args.min_size)}
    for name, sizes in layouts.items():
        w = chunk_means(rel, sizes)  # (N, K)
        p = (w / w.sum(1, keepdim=True)).mean(0).tolist()  # each chunk's first-draw probability, averaged
        print(f"{name:>9} {sizes!s:<28} P(first draw) = [{', '.join(f'{x:.2f}' for x in p)}]")
    if args.save:
        record = dict(model=args.model, num_prompts=B, num_generations=G, num_steps=args.num_steps, shift=args.shift,
                      mode=args.mode, eta=args.eta, seed=args.seed, sigmas=traj.sigmas[:T].tolist(),
                      mean=mean.tolist(), std=std.tolist(), between_prompt_std=between.tolist(),
                      within_prompt_std=within.tolist(), layouts=layouts)
        Path(args.save).write_text(json.dumps(record, indent=1))
        print(f"curve -> {args.save}")
    if args.out:
        plot(args.out, mean, std, layouts)


if __name__ == "__main__":
    import tyro
    try:
        main(tyro.cli(Args))
    except UsageError as e:
        raise SystemExit(f"error: {e}")
