"""
Evaluate base and trained models side by side, the way the papers report them: one row per model, every reward as
mean +- standard error, the same initial noise for every model, and a grid of images to look at.

    python eval.py --preset toy --checkpoints runs/toy-grpo runs/toy-chunk --hybrid-steps 10   # 1 CPU, minutes
    python eval.py --checkpoints runs/chunk --prompts hpdv2_test.txt --hybrid-steps 30          # 1 GPU, FLUX.1-dev
    torchrun --nproc_per_node 8 eval.py --checkpoints runs/grpo runs/chunk --hybrid-steps 30    # 8 GPUs, same numbers

The protocol (GCPO, ../shared/PAPERS.md section 4): FLUX.1-dev, 50-step ODE sampling (`--mode ode`; the SDE modes
are there to evaluate the stochastic policy RL trained), guidance embedding 3.5, 1024x1024, the HPDv2 test prompts.
Hybrid inference (`--hybrid-steps 30`, as GCPO and MixGRPO report it) lets the trained model take the first k steps,
the high-noise ones that set composition, and hands the fine detail to the base model, so that reward hacking in
textures does not reach the image; every checkpoint gets a row with and one without it.

Reproducibility: image j of global prompt p draws its initial and SDE noise from generators keyed by
(seed_for(seed, p), j) (sampler.rollout's `prompt_seeds`), so every model sees the same noise for the same prompt, and
a prompt's images do not depend on which rank or batch it lands in. Batches are fixed slices of the prompt list dealt
round-robin to ranks, so each prompt is even computed in the same batch under any world size, and torchrun gives
bit-identical numbers to a single process.

The toy world gets a GenEval-style breakdown: the exact verifier's strict accuracy (every atom right) per prompt
category, and `overall`, the mean over categories as GenEval computes it. Outputs, in --output-dir: table.md (also
printed), results.json (every image's scores, per-row summaries, the arguments) and grid.png (one column per model,
one row per prompt, captioned with score and prompt).
"""
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F

from runtime import PromptSource, checkpoints, image_grid, preset_cli, run, setup_distributed
from sampler import UsageError, load_model, load_transformer, rollout, seed_for


@dataclass
class Args:
    preset: str | None = None
    """`toy` (the CPU toy world); the defaults are GCPO's FLUX.1-dev evaluation protocol"""
    # --- models ---
    model: str = "black-forest-labs/FLUX.1-dev"
    """the base model: FLUX or SD3 pipeline (hub id or local diffusers folder), or `toy`; it also supplies the text
    encoders and VAE of every trained model"""
    checkpoints: tuple[str, ...] = ()
    """trained models, each a checkpoint folder (RUN/checkpoints/iter_XXXXX), its transformer/ subfolder, or a run
    folder (its newest checkpoint); `label=path` names the row"""
    hybrid_steps: tuple[int, ...] = ()
    """for each k, one more row per checkpoint: the trained model takes the first k steps, the base model the rest
    (GCPO: 30 of 50)"""
    # --- prompts and rewards ---
    prompts: str = "hpdv2_test.txt"
    """text file with one prompt per line, `toy` for the toy world's held-out split, or `toy:train`"""
    num_prompts: int | None = None
    """the first N prompts of the file (default: all); for `toy`, how many prompts to draw"""
    reward: tuple[str, ...] = ("hpsv3",)
    """rewards to report, each a column (names as in rewards.py; `name:weight` is accepted, the weight is ignored)"""
    reward_path: tuple[str, ...] = ()
    """`name=path` local checkpoints for rewards, overriding their hub ids"""
    # --- sampling ---
    mode: Literal["ode", "flow", "dance", "cps"] = "ode"
    """sampler: ode (deterministic, the papers' evaluation) or an SDE (the stochastic policy RL trains)"""
    eta: float = 0.7
    """noise level of an SDE mode (flow 0.7, dance 0.3); unused by ode"""
    num_steps: int = 50
    """denoising steps (GCPO evaluates with 50)"""
    shift: float = 3.0
    """resolution shift of the sigma schedule, as in training"""
    guidance_scale: float = 3.5
    """FLUX: the distilled guidance embedding; SD3: the classifier-free guidance scale"""
    height: int = 1024
    """image height in pixels (the toy model is always 32)"""
    width: int = 1024
    """image width in pixels"""
    num_generations: int = 1
    """images per prompt; the standard error is taken over prompts"""
    seed: int = 0
    """image j of prompt p starts from noise seeded by (seed, p, j), the same for every model"""
    batch_size: int = 4
    """prompts per sampling batch (memory only: results do not depend on it or on the number of ranks)"""
    # --- output ---
    output_dir: str = "runs/eval"
    """where table.md, results.json and grid.png go"""
    grid_prompts: int = 8
    """rows of the image grid: the first N prompts, first image of each"""
    device: str = "auto"
    """cuda, cpu or auto"""


PRESETS = {
    # The toy model samples with its training schedule (17 steps, shift 3); hybrid 10 of 17 is GCPO's 30 of 50.
    "toy": dict(model="toy", prompts="toy", num_prompts=200, reward=("toy",), num_steps=17, height=32, width=32,
                batch_size=50, output_dir="runs/toy-eval", device="cpu"),
}


def parse_args(argv=None) -> Args:
    return preset_cli(Args, PRESETS, argv)


# ----------------------------------------------------------------------------- inputs
def load_prompts(spec: str, num_prompts: int | None) -> list[str]:
    """The prompt list every rank agrees on: a file's first lines, or a fixed draw from the toy grammar (seed 1, the
    held-out prompts `python toy.py --eval-only` scores; fixed, so that --seed varies the noise, not the benchmark)."""
    if spec in ("toy", "toy:heldout", "toy:train"):
        from toy import sample_prompts
        return sample_prompts("train" if spec == "toy:train" else "heldout", num_prompts or 250, seed=1)
    return PromptSource(spec).lines[:num_prompts]  # one clear line if missing or empty


def in_toy_grammar(prompt: str) -> bool:
    from toy import parse
    try:
        parse(prompt)
    except ValueError:
        return False
    return True


def resolve_checkpoint(spec: str) -> tuple[str, Path]:
    """`[label=]path` -> (label, the transformer folder), from a checkpoint, its transformer/, or a run folder."""
    label, path = spec.split("=", 1) if "=" in spec else (spec, spec)
    path = Path(path)
    if (path / "config.json").is_file():
        return label, path
    if (path / "transformer" / "config.json").is_file():
        return label, path / "transformer"
    if runs := checkpoints(path):
        return (label if "=" in spec else f"{spec.rstrip('/')}/{runs[-1].name}"), runs[-1] / "transformer"
    raise UsageError(f"no checkpoint at {str(path)!r}: pass RUN/checkpoints/iter_XXXXX, its transformer/ folder, or a "
                     f"run folder holding checkpoints/ (train_grpo.py / train_chunk.py --output-dir)")


# ----------------------------------------------------------------------------- sampling
def batches(num_prompts: int, batch_size: int, rank: int = 0, world: int = 1) -> list[range]:
    """This rank's batches of global prompt indices: batch b is [b*bs, (b+1)*bs) and goes to rank b % world.

    A transformer's output depends on its batch at the 1e-7 level (kernel blocking), so fixing every prompt's batch
    whatever the world size is what makes a torchrun evaluation bit-identical to a single process.
    """
    starts = range(0, num_prompts, batch_size)
    return [range(s, min(s + batch_size, num_prompts)) for s in starts[rank::world]]


def hybrid_schedule(trained, base, k: int, num_steps: int) -> list:
    """The transformer of each step: `trained` for steps 0..k-1 (high noise: layout), `base` for the rest (detail)."""
    if not 0 <= k <= num_steps:
        raise UsageError(f"--hybrid-steps {k} is outside 0..{num_steps} (--num-steps)")
    return [trained] * k + [base] * (num_steps - k)


def sample(model, transformers, prompts, indices, *, seed=0, num_generations=1, shift=3.0, mode="ode", eta=0.7):
    """Images (N, 3, H, W), N = len(prompts) * G, of `prompts` (global indices `indices`); step i runs transformers[i].

    sampler.rollout is the one sampling loop; eval keys each prompt's noise by its index in the prompt set, so the
    noise of prompt p is the same whichever model, rank or batch samples it.
    """
    return rollout(model, prompts, num_generations=num_generations, num_steps=len(transformers), shift=shift,
                   mode=mode, eta=eta, prompt_seeds=[seed_for(seed, p) for p in indices],
                   transformers=transformers).images


# ----------------------------------------------------------------------------- scoring and summaries
def score_images(images, prompts, reward_fn, *, toy_world=False) -> dict:
    """Per-image scores {name: (N,)}: every reward component, and for the toy world the verifier's `strict` (0/1)."""
    _, components = reward_fn(images, prompts)
    scores = {name: v.detach().float().cpu() for name, v in components.items()}
    if toy_world:
        from toy import verify
        scores["strict"] = verify(images.float().cpu(), prompts).strict.float()  # (N,) GenEval-style accuracy
    return scores


def mean_se(values: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error of (P, G) scores; the error is over the P per-prompt means (a prompt's G images are
    not independent draws), which is the usual image-level error when G = 1."""
    per_prompt = values.double().mean(1)  # (P,)
    se = per_prompt.std() / len(per_prompt) ** 0.5 if len(per_prompt) > 1 else torch.tensor(float("nan"))
    return values.double().mean().item(), se.item()


def geneval_breakdown(strict: torch.Tensor, categories: list[str]) -> dict[str, float]:
    """Strict accuracy (N,) per toy category, and `overall` = the mean over categories (GenEval's overall score)."""
    from toy import CATEGORIES
    acc = {c: strict[[k == c for k in categories]].float().mean().item() for c in CATEGORIES if c in categories}
    return acc | {"overall": sum(acc.values()) / len(acc)}


def summarize(records: list[dict], labels: list[str], names: list[str], P: int, G: int) -> list[dict]:
    """One summary per row, from every rank's per-image records sorted by (row, prompt_index, generation):
    {label, mean, se, delta, delta_se: {name: float}[, geneval: {category: accuracy}]}.

    `delta` is the paired difference to row 0 (the base): same prompts and same noise, so its standard error is over
    per-prompt differences, which removes the prompts' own spread (the right error bar for "did training help").
    """
    summaries, by_row = [], [[r for r in records if r["row"] == m] for m in range(len(labels))]
    for label, mine in zip(labels, by_row):
        assert len(mine) == P * G, f"row {label!r} has {len(mine)} images, expected {P * G}"
        summary = {"label": label, "mean": {}, "se": {}, "delta": {}, "delta_se": {}}
        for name in names:
            values, base = (torch.tensor([r["scores"][name] for r in rs]).view(P, G) for rs in (mine, by_row[0]))
            summary["mean"][name], summary["se"][name] = mean_se(values)  # values: (P, G)
            summary["delta"][name], summary["delta_se"][name] = mean_se(values - base)
        if "strict" in mine[0]["scores"]:
            summary["geneval"] = geneval_breakdown(torch.tensor([r["scores"]["strict"] for r in mine]),
                                                   [r["category"] for r in mine])
        summaries.append(summary)
    return summaries


def markdown(rows: list[dict], names: list[str], caption: str) -> str:
    """The results table (each reward: mean ± s.e., then the paired difference to the base) and the toy breakdown."""
    head = [h for n in names for h in (n, f"Δ {n} vs base")]
    lines = [caption, "", "| model | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    for i, r in enumerate(rows):
        cells = [c for n in names for c in (f"{r['mean'][n]:.4f} ± {r['se'][n]:.4f}",
                                             f"{r['delta'][n]:+.4f} ± {r['delta_se'][n]:.4f}" if i else "")]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    if "geneval" in rows[0]:
        cats = list(rows[0]["geneval"])
        lines += ["", "GenEval-style strict accuracy of the toy verifier by category:", "",
                  "| model | " + " | ".join(cats) + " |", "|---|" + "---|" * len(cats)]
        lines += [f"| {r['label']} | " + " | ".join(f"{r['geneval'][c]:.3f}" for c in cats) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def comparison_grid(tiles: dict, captions: dict, labels: list[str], num_prompts: int):
    """One column per model, one row per prompt, from uint8 tiles {(row, p): (3, H, W)} and captions {(row, p): str},
    under a header naming the models. Tiles are shown 160 to 256 pixels high."""
    from PIL import Image, ImageDraw
    M = len(labels)
    images = torch.stack([tiles[m, p] for p in range(num_prompts) for m in range(M)]).float() / 255  # (R*M, 3, H, W)
    if images.shape[-2] > 256:  # a FLUX grid of 1024 px tiles would be unwieldy
        images = F.interpolate(images, size=(256, 256 * images.shape[-1] // images.shape[-2]), mode="area")
    body = image_grid(images, [captions[m, p] for p in range(num_prompts) for m in range(M)], cols=M,
                      scale=max(1, 160 // images.shape[-2]))
    w, c, header = body.width // M, body.width // M // 6, 26  # c: characters per line (the default font ~6 px)
    grid = Image.new("RGB", (body.width, body.height + header), "white")
    grid.paste(body, (0, header))
    for m, label in enumerate(labels):  # the label's end, over two lines: run names and steps matter most
        text = label[-2 * c:]
        ImageDraw.Draw(grid).multiline_text((m * w + 2, 1), text[:c] + "\n" + text[c:], fill="black", spacing=1)
    return grid


def gather_objects(obj):
    """Every rank's picklable `obj`, as a list ordered by rank (world size 1: [obj])."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------- main
def evaluate(model, rows, prompts, reward_fn, args: Args, rank=0, world=1, toy_world=False):
    """Sample and score every row on this rank's batches. `rows`: (label, transformer folder or None, k), the model
    of that folder (the base when None) running the first k of the N steps and the base model the rest.

    Returns this rank's per-image records and the grid's tiles {(row, prompt): uint8 (3, H, W)}.
    """
    base, G, N = model.transformer.eval(), args.num_generations, args.num_steps
    if toy_world:
        from toy import category
    records, tiles, trained, loaded = [], {}, base, None
    for row, (label, folder, k) in enumerate(rows):
        if folder != loaded:  # a checkpoint is loaded once for its rows and dropped before the next one
            trained = None
            trained = load_transformer(model, folder)
            loaded = folder
        schedule = hybrid_schedule(trained, base, k, N)
        for idx in batches(len(prompts), args.batch_size, rank, world):
            images = sample(model, schedule, [prompts[p] for p in idx], idx, seed=args.seed, num_generations=G,
                            shift=args.shift, mode=args.mode, eta=args.eta)  # (b*G, 3, H, W)
            pairs = [(p, j) for p in idx for j in range(G)]
            scores = score_images(images, [prompts[p] for p, _ in pairs], reward_fn, toy_world=toy_world)
            for i, (p, j) in enumerate(pairs):
                records.append({"row": row, "model": label, "prompt_index": p, "generation": j, "prompt": prompts[p],
                                **({"category": category(prompts[p])} if toy_world else {}),
                                "scores": {name: s[i].item() for name, s in scores.items()}})
                if p < args.grid_prompts and j == 0:  # uint8 on the CPU: cheap to gather
                    tiles[row, p] = (images[i].float().cpu() * 255).round().to(torch.uint8)  # (3, H, W)
    return records, tiles


def report(records, tiles, labels, prompts, args: Args) -> str:
    """The Markdown table (returned), results.json and grid.png in args.output_dir, from every rank's records."""
    P, G = len(prompts), args.num_generations
    records = sorted(records, key=lambda r: (r["row"], r["prompt_index"], r["generation"]))
    names = [n for n in records[0]["scores"] if n != "strict"]
    summaries = summarize(records, labels, names, P, G)
    caption = (f"{args.prompts}: {P} prompts x {G} image{'s' * (G > 1)}, {args.num_steps}-step {args.mode} sampling, "
               f"shift {args.shift:g}, seed {args.seed}; mean ± standard error over prompts; Δ: paired with the base"
               + ("; [hybrid k/N]: the trained model takes the first k of N steps, the base model the rest"
                  if args.hybrid_steps else ""))
    table = markdown(summaries, names, caption)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table)
    (out / "results.json").write_text(json.dumps({"args": asdict(args), "rows": summaries, "images": records}, indent=1))
    R = min(args.grid_prompts, P)
    if R:
        captions = {(r["row"], r["prompt_index"]): f"{r['scores'][names[0]]:.2f} {r['prompt']}" for r in records
                    if r["generation"] == 0 and r["prompt_index"] < R}
        comparison_grid(tiles, captions, labels, R).save(out / "grid.png")
    return table


def main(args: Args):
    device, rank, world = setup_distributed(args)
    print0 = print if rank == 0 else lambda *a, **k: None
    # Everything a user can get wrong fails here, before a model is loaded.
    ckpts = [resolve_checkpoint(c) for c in args.checkpoints]
    if args.hybrid_steps and not ckpts:
        raise UsageError("--hybrid-steps needs at least one trained model in --checkpoints")
    for k in args.hybrid_steps:
        hybrid_schedule(None, None, k, args.num_steps)
    prompts = load_prompts(args.prompts, args.num_prompts)
    if not prompts:
        raise UsageError(f"--num-prompts {args.num_prompts} leaves no prompts to evaluate")
    from rewards import build_reward
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # Rewards in the model's dtype: on a GPU, FLUX, a second transformer for the hybrid rows and HPSv3's 7B backbone
    # share one device.
    reward_fn = build_reward(list(args.reward), device=device, dtype=dtype, paths=list(args.reward_path))
    model = load_model(args.model, device=device, dtype=dtype, height=args.height, width=args.width,
                       guidance_scale=args.guidance_scale)
    toy_world = model.kind == "toy"  # the exact verifier applies: a GenEval-style breakdown by category
    if toy_world and (bad := next((p for p in prompts if not in_toy_grammar(p)), None)):
        raise UsageError(f"prompt {bad!r} is outside the toy grammar; evaluate the toy model with --prompts toy")

    # Rows: the base model, then per checkpoint the plain model (all N steps) and each hybrid k.
    N = args.num_steps
    rows = [(args.model, None, 0)]
    for label, folder in ckpts:
        rows += [(label, folder, N)] + [(f"{label} [hybrid {k}/{N}]", folder, k) for k in args.hybrid_steps]
    print0(f"evaluating {len(rows)} models on {len(prompts)} prompts x {args.num_generations} images, {N}-step "
           f"{args.mode} sampling, {world} rank(s), batches of {args.batch_size} prompts")
    records, tiles = evaluate(model, rows, prompts, reward_fn, args, rank, world, toy_world)
    records = [r for part in gather_objects(records) for r in part]
    tiles = {key: t for part in gather_objects(tiles) for key, t in part.items()}
    if rank == 0:
        print(report(records, tiles, [label for label, _, _ in rows], prompts, args))
        print(f"wrote {args.output_dir}/table.md, results.json, grid.png")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    run(main, parse_args)
