"""
Chunk-level GRPO (Chunk-GRPO, published again as GCPO): what it changes in train_grpo.py, and nothing else.

    python train_chunk.py --preset toy                                   # 1 CPU: the toy world, minutes
    python train_chunk.py --num-iterations 150                           # 1 GPU: GCPO on FLUX.1-dev
    torchrun --nproc_per_node 8 train_chunk.py --chunk-weighted-sampling # 8 GPUs: the paper's recipe

Step-level GRPO treats each denoising step as an action with its own importance ratio. Chunk-GRPO groups the T
trainable steps into K contiguous chunks (chunking.py: small where the latents move fast, one long chunk over
the flat tail; the FLUX recipe is [2, 3, 4, 7]) and optimises each chunk as one action:

    r_j  = exp( mean_{t in chunk j} (logp_theta_t - logp_old_t) )       (GCPO Eq. 15, length-normalised)
    loss = max(-A r_j, -A clip(r_j, 1 - eps, 1 + eps))                  (the same PPO clip, per chunk)

Whole chunks of several trajectories share one transformer forward of up to --train-batch-size rows (each row
its own sigma); a chunk is never split across forwards. Each trajectory trains a `chunk_fraction` of its
chunks (2 of 4 in the recipe; with `--sde-window`, of the chunks inside the window), drawn uniformly or, with
`--chunk-weighted-sampling`, with probability proportional to the chunk's mean L1rel on that trajectory; only
the selection changes, the loss is not reweighted. K = T chunks of size 1 is exactly step-level GRPO; K = 1 is
sequence-level (GSPO-like). Note that uneven chunks reweight steps: a step in a size-2 chunk gets about twice
the gradient weight it has in step-level GRPO, one in the size-7 chunk about 0.57x. `--chunk-ratio step` is
the control for everything chunking changes besides the ratio: the same chunks selected and the same
1/|chunk| step weights, but each step its own ratio and clip,

    loss = mean_{t in chunk j} max(-A r_t, -A clip(r_t, 1 - eps, 1 + eps)),    r_t = exp(logp_t - logp_old_t)
"""

import itertools
import json
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated, Literal

import torch
import torch.distributed as dist

import train_grpo
from chunking import chunk_bounds, chunk_means, l1rel, make_layout, select_chunks
from plumbing import recipes
from plumbing.runtime import Range, UsageError, run
from sampler import num_selected
from train_grpo import Args, ppo_clip_loss


@dataclass
class ChunkArgs(Args):
    # --- chunks ---
    chunk_layout: Literal["fixed", "uniform", "curve", "adaptive"] = "fixed"
    """how the T trainable steps are cut (chunking.py): fixed sizes, one size, or fitted to an L1rel curve"""
    chunk_sizes: Annotated[tuple[int, ...], Range(">= 1")] = (2, 3, 4, 7)
    """`fixed` layout: chunk sizes from high noise to low, summing to T (GCPO on FLUX: 2 3 4 7, T = 16)"""
    chunk_size: Annotated[int, Range(">= 1")] = 4
    """`uniform` layout: the size of every chunk (the last one shorter if it does not divide T)"""
    chunk_curve: str | None = None
    """`curve`/`adaptive` layouts: the model's L1rel curve, the l1rel.json `python chunking.py` writes"""
    num_chunks: Annotated[int, Range(">= 1")] = 4
    """`curve` layout: K, the number of chunks fitted to the curve"""
    chunk_min_size: Annotated[int, Range(">= 1")] = 2
    """`curve`/`adaptive` layouts: the smallest chunk allowed"""
    chunk_fraction: Annotated[float, Range("in (0, 1]")] = 0.5
    """fraction of each trajectory's chunks trained per iteration (GCPO: 0.5, i.e. 2 of 4)"""
    chunk_weighted_sampling: bool = False
    """draw the trained chunks with probabilities from each chunk's mean L1rel on the trajectory (GCPO)"""
    chunk_weighting: Literal["normalized", "softmax"] = "normalized"
    """with --chunk-weighted-sampling: p proportional to the mean L1rel (normalized) or to its softmax"""
    chunk_ratio: Literal["chunk", "step"] = "chunk"
    """chunk: one ratio and clip per chunk (GCPO); step: the control, a ratio and clip per step, averaged over
    the chunk (same selection and step weights; chunks of size 1 make both step-level GRPO)"""


PRESETS = recipes.CHUNK  # the trainer's recipes; the toy one cuts the toy model's own L1rel curve


def first_fit_batches(lengths, capacity):
    """Batches of unit indices, each batch at most `capacity` rows in all: first-fit decreasing (longest units
    first, ties in index order, each into the first batch with room), so the batches come out nearly full.
    A unit longer than `capacity` gets a batch of its own."""
    batches, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):  # stable: deterministic
        j = next((j for j, free in enumerate(room) if free >= lengths[i]), len(batches))
        if j == len(batches):
            batches.append([])
            room.append(capacity)
        batches[j].append(i)
        room[j] -= lengths[i]
    return batches


def chunk_mean(x, seg, size):
    """Each chunk's mean of per-row values: x (M,), seg (M,) each row's chunk in 0..m-1, size (m,)."""
    return x.new_zeros(len(size)).index_add(0, seg, x) / size


def chunk_loss(learner, traj, adv, kept, rows, chunks, sizes, scale):
    """Forward + backward the chunk-level loss of trajectories `rows` (n,) at their selected `chunks` (n, k).

    Whole chunks of any trajectories are packed into forwards of at most --train-batch-size rows (each row a
    step at its own sigma), one graph and one backward per forward. A chunk is never split: one longer than
    --train-batch-size gets a forward of its own, and memory is then that of the largest chunk. Scaled like
    train_grpo.step_loss (scale / k per chunk, times `kept`), so chunks of size 1 give exactly the step-level
    gradient. Returns the (n*k,) chunk ratios, row-major in (rows, chunks), as the metrics expect.
    """
    a, k, device = learner.args, chunks.shape[1], rows.device
    bounds = torch.tensor(chunk_bounds(sizes), device=device)  # (K, 2) each chunk's steps [start, end)
    start, end = bounds[chunks.flatten().to(device)].unbind(1)  # (n*k,) of each trained chunk, row-major
    row, size = rows.repeat_interleave(k), end - start  # (n*k,) its trajectory and its number of steps
    batches = first_fit_batches(size.tolist(), a.train_batch_size)  # lists of indices into row
    ratios = torch.empty(len(row), device=device)  # (n*k,)
    # Ranks pack their own chunks into different numbers of forwards, but under FSDP each forward and backward
    # is a collective: a rank with fewer runs idle ones (one row, zero loss) until it has run as many as all.
    max_forwards = torch.tensor(len(batches), device=device)
    if dist.is_initialized():  # before any forward: the ranks' collectives must come in the same order
        dist.all_reduce(max_forwards, op=dist.ReduceOp.MAX)
    for batch in batches:
        u = torch.tensor(batch, device=device)  # (m,) the chunks of this forward
        c = size[u]  # (m,) their sizes, M = c.sum() rows
        seg = torch.arange(len(u), device=device).repeat_interleave(c)  # (M,) each forward row's chunk
        offset = torch.arange(len(seg), device=device) - (c.cumsum(0) - c)[seg]  # (M,) its step in the chunk
        r, t = row[u][seg], start[u][seg] + offset  # (M,) each forward row's trajectory and step
        logp, kl = learner.log_probs(traj, r, t)  # (M,), (M,)
        log_ratio = logp - traj.log_probs[r, t]  # (M,)
        # r_j = exp(mean_{t in chunk j}(logp_theta_t - logp_old_t))  (GCPO Eq. 15)
        ratio = chunk_mean(log_ratio, seg, c).exp()  # (m,)
        if a.chunk_ratio == "chunk":
            loss = ppo_clip_loss(ratio, adv[row[u]], a.clip_range) + a.beta * chunk_mean(kl, seg, c)
        else:  # the control: each step's own ratio and clip, averaged over its chunk (still reported: r_j)
            loss = chunk_mean(ppo_clip_loss(log_ratio.exp(), adv[r], a.clip_range) + a.beta * kl, seg, c)
        ((loss * kept[row[u]]).sum() * scale / k).backward()
        ratios[u] = ratio.detach()
    for _ in range(int(max_forwards) - len(batches)):
        logp, kl = learner.log_probs(traj, row[:1], start[:1])
        ((logp + kl).sum() * 0).backward()
    return ratios  # (n*k,)


def window_chunks(sizes, sde_window: int) -> int:
    """How many chunks, from the high-noise end, lie in the SDE window (all of them without one); a window
    must end where a chunk does, so that every chunk is either stochastic or not."""
    if not sde_window:
        return len(sizes)
    ends = list(itertools.accumulate(sizes))  # where each chunk ends
    if sde_window not in ends:
        raise UsageError(
            f"--sde-window {sde_window} ends inside a chunk of the layout {sizes}; choose a window that ends "
            f"with a chunk: one of {', '.join(map(str, ends))}"
        )
    return ends.index(sde_window) + 1


def chunk_objective(learner, traj, adv, kept, rows, scale, generator, *, sizes):
    """Chunk-level GRPO: pick each trajectory's chunks (uniformly, or weighted by L1rel) among those in the
    SDE window (all K without one), then chunk_loss."""
    a = learner.args
    K = window_chunks(sizes, a.sde_window)  # the first K chunks are stochastic: only they can train
    if a.chunk_weighted_sampling:
        weights = chunk_means(l1rel(traj.latents[rows]), sizes)[:, :K].cpu()  # (n, K) mean L1rel of a chunk
        chunks = select_chunks(weights, a.chunk_fraction, method=a.chunk_weighting, generator=generator)
    else:
        shape = (len(rows), K)
        chunks = select_chunks(None, a.chunk_fraction, method="uniform", generator=generator, shape=shape)
    trained = torch.bincount(chunks.flatten(), minlength=len(sizes)).tolist()  # (K,) times each chunk trains
    histogram = {f"chunks/{j}": c for j, c in enumerate(trained)}
    return chunk_loss(learner, traj, adv, kept, rows, chunks, sizes, scale), histogram


def layout(args: ChunkArgs) -> list[int]:
    """The chunk sizes for T = num_steps - 1 trainable steps, from the layout flags (validated)."""
    curve = None
    if args.chunk_layout in ("curve", "adaptive"):
        if args.chunk_curve is None or not Path(args.chunk_curve).is_file():
            raise UsageError(
                f"--chunk-layout {args.chunk_layout} needs --chunk-curve FILE, a measured L1rel curve "
                f"(got {args.chunk_curve!r}); write one with `python chunking.py --output-dir DIR`"
            )
        try:
            curve = torch.tensor(json.loads(Path(args.chunk_curve).read_text())["mean"], dtype=torch.float64)
        except (ValueError, KeyError, TypeError, RuntimeError):
            curve = torch.tensor([math.nan])  # unreadable: refused below
        if curve.ndim != 1 or not (torch.isfinite(curve) & (curve >= 0)).all():
            msg = f"--chunk-curve {args.chunk_curve}: not an L1rel record (a 'mean' list of numbers >= 0)"
            raise UsageError(msg)
        curve = curve.tolist()
    return make_layout(
        args.chunk_layout,
        args.num_steps - 1,
        sizes=args.chunk_sizes,
        size=args.chunk_size,
        mean_curve=curve,
        num_chunks=args.num_chunks,
        min_size=args.chunk_min_size,
    )


def describe_chunks(args: ChunkArgs, T: int) -> list[str]:
    """The chunk objective's lines of the derived totals (validates the layout flags)."""
    sizes = layout(args)
    K = window_chunks(sizes, args.sde_window)
    k = num_selected(K, args.chunk_fraction)
    selection = f"weighted ({args.chunk_weighting} L1rel)" if args.chunk_weighted_sampling else "uniform"
    window = f" (the SDE window's first {args.sde_window} steps)" if args.sde_window else ""
    return [
        f"chunk layout ({args.chunk_layout}): {sizes}, K = {len(sizes)}",
        f"trained chunks per trajectory: {k} of {K}{window}, selection {selection}",
        "importance ratio: "
        + ("one per chunk (GCPO)" if args.chunk_ratio == "chunk" else "one per step (control)"),
    ]


def main(args: ChunkArgs):
    objective = partial(chunk_objective, sizes=layout(args))
    train_grpo.main(args, objective=objective, describe=describe_chunks)


if __name__ == "__main__":
    run(main, ChunkArgs, PRESETS)
