"""
Evaluate base and trained models side by side, the way the papers report them: one row per model, every reward
as mean +- standard error, the same initial noise for every model, and a grid of images to look at.

    python eval.py --preset toy --checkpoints runs/toy-grpo runs/toy-chunk --hybrid-steps 10   # 1 CPU
    python eval.py --checkpoints runs/chunk --hybrid-steps 30                                   # 1 GPU, FLUX
    torchrun --nproc_per_node 8 eval.py --checkpoints runs/grpo runs/chunk --hybrid-steps 30    # 8 GPUs

The protocol (GCPO, arXiv 2510.21583, code github xingzhejun/GCPO): FLUX.1-dev, 50-step ODE sampling
(`--sde-mode ode`; the SDE modes are there to evaluate the stochastic policy RL trained), guidance embedding
3.5, 1024x1024, the HPDv2 test prompts. Hybrid inference (`--hybrid-steps 30`, as GCPO and MixGRPO report it)
lets the trained model take the first k steps, the high-noise ones that set composition, and hands the fine
detail to the base model, so that reward hacking in textures does not reach the image; every checkpoint gets a
row with and one without it.

Reproducibility: image j of global prompt p draws its initial and SDE noise from generators keyed by
(seed_for(seed, p), j) (sampler.rollout's `prompt_seeds`), so every model sees the same noise for the same
prompt, and a prompt's images do not depend on which rank or batch it lands in. Batches are fixed slices of
the prompt list dealt round-robin to ranks, so each prompt is even computed in the same batch under any world
size, and torchrun gives bit-identical numbers to a single process.

The toy world gets a GenEval-style breakdown: the exact verifier's strict accuracy (every atom right) per
prompt category, and `overall`, the mean over categories as GenEval computes it. Outputs, in --output-dir:
table.md (also printed), results.json (every image's scores, per-row summaries, the arguments) and grid.png
(one column per model, one row per prompt, captioned with score and prompt); plumbing/tables_and_figures.py
makes them.
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch
import torch.distributed as dist

from plumbing import lora, recipes, toy
from plumbing.checkpoints import checkpoints
from plumbing.models import load_model, load_transformer
from plumbing.prompts import PromptSource, outside_toy_grammar
from plumbing.runtime import (
    Range,
    UsageError,
    gather_objects,
    print0,
    run,
    seed_for,
    setup_distributed,
    writable_dir,
)
from plumbing.tables_and_figures import comparison_grid, markdown, summarize
from rewards import build_reward
from sampler import SamplingArgs, mode_defaults, rollout, sampling_settings


@dataclass
class Args(SamplingArgs):
    preset: str | None = None
    """`toy` (the CPU toy world); the defaults are GCPO's FLUX.1-dev evaluation protocol"""
    # --- models ---
    model: str = "black-forest-labs/FLUX.1-dev"
    """the base model: FLUX or SD3 pipeline (hub id or local diffusers folder), or `toy`; it also supplies the
    text encoders and VAE of every trained model"""
    checkpoints: tuple[str, ...] = ()
    """trained models, each a checkpoint folder (RUN/checkpoints/iter_XXXXX: its ema/ if it has one), its
    transformer/, ema/ or lora/ (evaluated as base + adapter), or a run folder (its newest checkpoint);
    `label=path` names the row"""
    hybrid_steps: tuple[int, ...] = ()
    """for each k, one more row per checkpoint: the trained model takes the first k steps, the base model the
    rest (GCPO: 30 of 50)"""
    # --- prompts and rewards ---
    prompts: str = "hpdv2:test"
    """text file of one prompt a line, a named set (plumbing/prompts.py; GCPO: hpdv2:test), or
    toy[:heldout|:train]"""
    num_prompts: Annotated[int | None, Range(">= 1")] = None
    """the first N prompts of the file (default: all); of the toy grammar's fixed list (default: 250)"""
    reward: tuple[str, ...] = ("hpsv3",)
    """rewards to report, a column each (names as in rewards.py; a `name:weight` weight is ignored)"""
    reward_path: tuple[str, ...] = ()
    """`name=path` local checkpoints for rewards, overriding their hub ids"""
    # --- sampling (and sampler.SamplingArgs): the papers' protocol, GCPO's 50-step ODE, pipeline sigmas ---
    num_steps: int = 50
    schedule: Literal["shift", "pipeline"] = "pipeline"
    sde_mode: Literal["flow", "dance", "cps", "ode"] = "ode"
    guidance_scale: Annotated[float, Range(">= 0")] = 3.5
    """FLUX: the distilled guidance embedding; SD3: the classifier-free guidance scale"""
    height: Annotated[int, Range("a positive multiple of 16")] = 1024
    """image height in pixels (the toy model is always 32)"""
    width: Annotated[int, Range("a positive multiple of 16")] = 1024
    """image width in pixels"""
    num_generations: Annotated[int, Range(">= 1")] = 1
    """images per prompt; the standard error is taken over prompts"""
    seed: Annotated[int, Range(">= 0")] = 0
    """image j of prompt p starts from noise seeded by (seed, p, j), the same for every model"""
    prompts_per_batch: Annotated[int, Range(">= 1")] = 4
    """prompts per sampling batch (memory only: results do not depend on it or on the number of ranks)"""
    # --- output ---
    output_dir: str = "runs/eval"
    """where table.md, results.json and grid.png go"""
    grid_prompts: Annotated[int, Range(">= 0")] = 8
    """rows of the image grid: the first N prompts, first image of each"""
    timeout: Annotated[float, Range("> 0")] = 600.0
    """seconds a collective waits for the other ranks before the job stops (a hung or dead rank)"""


PRESETS = recipes.EVAL  # --preset toy


# ----------------------------------------------------------------------------- inputs
def resolve_checkpoint(spec: str) -> tuple[str, Path]:
    """`[label=]path` -> (label, transformer or LoRA folder), from a checkpoint (its ema/ if it kept the
    average of the weights, else its transformer/ or lora/), one of those folders, or a run folder."""
    label, path = spec.split("=", 1) if "=" in spec else (spec, spec)
    path = Path(path)
    if holds_weights(path):
        return label, path
    if runs := checkpoints(path):  # a run: its newest checkpoint
        path, label = runs[-1], (label if "=" in spec else f"{spec.rstrip('/')}/{runs[-1].name}")
    for name in ("ema", "lora", "transformer"):
        if holds_weights(path / name):
            return (f"{label} ema" if name == "ema" and "=" not in spec else label), path / name
    raise UsageError(
        f"no checkpoint at {str(path)!r}: pass RUN/checkpoints/iter_XXXXX, its transformer/ folder, or a "
        f"run folder holding checkpoints/ (train_grpo.py / train_chunk.py --output-dir)"
    )


def holds_weights(folder: Path) -> bool:
    """A transformer in diffusers format, or a LoRA run's adapter (evaluated as base + adapter)."""
    return (folder / "config.json").is_file() or (folder / lora.WEIGHTS).is_file()


# ----------------------------------------------------------------------------- sampling
def batches(num_prompts: int, batch_size: int, rank: int = 0, world: int = 1) -> list[range]:
    """This rank's batches of global prompt indices: batch b is [b*bs, (b+1)*bs) and goes to rank b % world.

    A transformer's output depends on its batch at the 1e-7 level (kernel blocking), so fixing every prompt's
    batch whatever the world size is what makes a torchrun evaluation bit-identical to a single process.
    """
    starts = range(0, num_prompts, batch_size)
    return [range(s, min(s + batch_size, num_prompts)) for s in starts[rank::world]]


def hybrid_schedule(trained, base, k: int, num_steps: int) -> list:
    """The transformer of each step: `trained` for steps 0..k-1 (high noise: layout), `base` for the rest."""
    if not 0 <= k <= num_steps:
        raise UsageError(f"--hybrid-steps {k} is outside 0..{num_steps} (--num-steps)")
    return [trained] * k + [base] * (num_steps - k)


def sample(model, transformers, prompts, indices, *, seed=0, num_generations=1, **sampling):
    """Images (N, 3, H, W), N = len(prompts) * G, of `prompts` (global indices `indices`); step i runs
    transformers[i]. sampler.rollout is the one sampling loop; eval keys each prompt's noise by its index in
    the prompt set, so the noise of prompt p is the same whichever model, rank or batch samples it.
    `sampling`: rollout's num_steps (len(transformers)), mode, eta, shift or sigmas (sampling_settings)."""
    keys = dict(num_generations=num_generations, prompt_seeds=[seed_for(seed, p) for p in indices])
    return rollout(model, prompts, transformers=transformers, **keys, **sampling).images


def score_images(images, prompts, reward_fn, *, toy_world=False) -> dict:
    """Per-image scores {name: (N,)}: every reward component, and on the toy world the verifier's 0/1 `strict`
    (GenEval-style accuracy: every atom of the prompt right) and two measures of clean drawing it does not
    read, `fit` and `faint` (drawing_quality)."""
    _, components = reward_fn(images, prompts)
    scores = {name: v.detach().float().cpu() for name, v in components.items()}
    if toy_world:
        images = images.float().cpu()
        scores["strict"] = toy.verify(images, prompts).strict.float()  # (N,)
        scores |= drawing_quality(images, prompts)
    return scores


def drawing_quality(images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Two measures of how cleanly toy images (N, 3, H, W) are drawn that the verifier's score does not read,
    to tell drawing from reward hacking, each (N,): `fit`, the share of an image's components in its prompt's
    colours that fit a template at IoU >= toy.MIN_IOU (0 when it draws none; rendered scenes: 1), and `faint`,
    the share of pixels neither background nor bright (max channel in [0.05, 0.35]; rendered scenes: 0), the
    texture a drifting policy paints below the verifier's colour tolerance."""
    fit = []
    for prompt, objects in zip(prompts, toy.detect(images), strict=True):
        colours = {colour for _, colour, _ in toy.parse(prompt).groups}
        mine = [o for o in objects if o[0] in colours]  # (colour, shape or None, cx, cy, iou)
        fit.append(sum(o[1] is not None for o in mine) / max(len(mine), 1))
    bright = images.float().amax(1)  # (N, H, W)
    faint = ((bright >= 0.05) & (bright <= 0.35)).flatten(1).float().mean(1)  # (N,)
    return {"fit": torch.tensor(fit), "faint": faint}


# ----------------------------------------------------------------------------- main
def evaluate(model, rows, prompts, reward_fn, args: Args, rank=0, world=1, toy_world=False):
    """Sample and score every row on this rank's batches. `rows`: (label, transformer folder or None, k), the
    model of that folder (the base when None) running the first k of the N steps and the base model the rest.

    Returns this rank's per-image records (see plumbing/tables_and_figures.py) and the grid's tiles
    {(row, prompt): uint8 image}.
    """
    base, G, N = model.transformer.eval(), args.num_generations, args.num_steps
    sampling = sampling_settings(args, model) | dict(seed=args.seed, num_generations=G)
    records, tiles, trained, loaded = [], {}, base, None
    for row, (label, folder, k) in enumerate(rows):
        if folder != loaded:  # a checkpoint is loaded once for its rows
            trained = None  # drop the previous one first: two FLUX transformers beside the base would not fit
            trained = load_transformer(model, folder)
            loaded = folder
        schedule = hybrid_schedule(trained, base, k, N)
        for idx in batches(len(prompts), args.prompts_per_batch, rank, world):
            images = sample(model, schedule, [prompts[p] for p in idx], idx, **sampling)  # (b*G, 3, H, W)
            pairs = [(p, j) for p in idx for j in range(G)]
            scores = score_images(images, [prompts[p] for p, _ in pairs], reward_fn, toy_world=toy_world)
            for i, (p, j) in enumerate(pairs):
                record = {
                    "row": row,
                    "model": label,
                    "prompt_index": p,
                    "generation": j,
                    "prompt": prompts[p],
                }
                if toy_world:
                    record["category"] = toy.category(prompts[p])
                record["scores"] = {name: s[i].item() for name, s in scores.items()}
                records.append(record)
                if p < args.grid_prompts and j == 0:  # uint8 on the CPU: cheap to gather
                    tiles[row, p] = (images[i].float().cpu() * 255).round().to(torch.uint8)  # (3, H, W)
    return records, tiles


def schedule_name(args: Args) -> str:
    return "the pipeline's" if args.schedule == "pipeline" else f"shift {args.shift:g}"


def write_report(records, tiles, labels, prompts, args: Args) -> str:
    """The Markdown table (returned), results.json and grid.png in args.output_dir, from all records."""
    P, G = len(prompts), args.num_generations
    records = sorted(records, key=lambda r: (r["row"], r["prompt_index"], r["generation"]))
    names = [n for n in records[0]["scores"] if n != "strict"]
    summaries = summarize(records, labels, names, P, G)
    caption = (
        f"{args.prompts}: {P} prompts x {G} image{'s' * (G > 1)}, {args.num_steps}-step {args.sde_mode} "
        f"sampling, {schedule_name(args)} schedule, seed {args.seed}; mean ± standard error over prompts; "
        f"Δ: paired with the base"
    )
    if args.hybrid_steps:
        caption += "; [hybrid k/N]: the trained model takes the first k of N steps, the base model the rest"
    table = markdown(summaries, names, caption)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table)
    results = {"args": asdict(args), "rows": summaries, "images": records}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    R = min(args.grid_prompts, P)
    if R:
        firsts = [r for r in records if r["generation"] == 0 and r["prompt_index"] < R]
        captions = {
            (r["row"], r["prompt_index"]): f"{r['scores'][names[0]]:.2f} {r['prompt']}" for r in firsts
        }
        comparison_grid(tiles, captions, labels, R).save(out / "grid.png")
    return table


def main(args: Args):
    args = mode_defaults(args)  # eta of the --sde-mode's recipe unless given
    device, rank, world = setup_distributed(args)
    # Everything a user can get wrong fails here, before a model is loaded.
    ckpts = [resolve_checkpoint(c) for c in args.checkpoints]
    if args.hybrid_steps and not ckpts:
        raise UsageError("--hybrid-steps needs at least one trained model in --checkpoints")
    for k in args.hybrid_steps:
        hybrid_schedule(None, None, k, args.num_steps)
    prompts = PromptSource(args.prompts, toy_split="heldout").head(args.num_prompts)
    if not prompts:
        raise UsageError(f"--num-prompts {args.num_prompts} leaves no prompts to evaluate")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # Rewards in the model's dtype: on a GPU, FLUX, a second transformer for the hybrid rows and HPSv3's 7B
    # backbone share one device.
    reward_fn = build_reward(list(args.reward), device=device, dtype=dtype, paths=list(args.reward_path))
    size = dict(height=args.height, width=args.width, guidance_scale=args.guidance_scale)
    # The stock pipelines feed the transformer sigma itself; training quantises it as DanceGRPO and GCPO do.
    quantize = args.schedule == "shift"
    model = load_model(args.model, device=device, dtype=dtype, quantize_timestep=quantize, **size)
    toy_world = model.kind == "toy"  # the exact verifier applies: a GenEval-style breakdown by category
    outside = outside_toy_grammar(prompts) if toy_world else None
    if outside is not None:
        raise UsageError(
            f"prompt {outside[:80]!r} is outside the toy grammar; evaluate the toy model on toy prompts"
        )
    writable_dir(args.output_dir)  # now, not after all the sampling

    # Rows: the base model, then per checkpoint the plain model (all N steps) and each hybrid k.
    N = args.num_steps
    rows = [(args.model, None, 0)]
    for label, folder in ckpts:
        rows.append((label, folder, N))
        rows += [(f"{label} [hybrid {k}/{N}]", folder, k) for k in args.hybrid_steps]
    print0(
        f"evaluating {len(rows)} models on {len(prompts)} prompts x {args.num_generations} images, {N}-step "
        f"{args.sde_mode} sampling, {world} rank(s), batches of {args.prompts_per_batch} prompts"
    )
    records, tiles = evaluate(model, rows, prompts, reward_fn, args, rank, world, toy_world)
    records = [r for part in gather_objects(records) for r in part]
    tiles = {key: t for part in gather_objects(tiles) for key, t in part.items()}
    if rank == 0:
        print(write_report(records, tiles, [label for label, _, _ in rows], prompts, args))
        print(f"wrote {args.output_dir}/table.md, results.json, grid.png")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    run(main, Args, PRESETS)
