"""
Plumbing under every script: the user-error type and the one entry point that reports it, torchrun setup,
FSDP2 sharding, cross-rank reductions, seeds, prompt sources, atomic checkpoints, the rank-0 logger and image
grids. Nothing here is part of the algorithm (train_grpo.py holds that); of the project it imports only
toy.py.
"""

import json
import os
import shutil
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import toy


class UsageError(Exception):
    """A mistake of the user's (a flag, a path, a file): scripts print its one-line message and exit 1."""


def cli(cls, presets=None, argv=None):
    """Parse argv into the dataclass `cls` with tyro. With `presets`, `--preset NAME` first switches the
    defaults wholesale (presets are plain Python values); the last `--preset` on the line wins."""
    import tyro

    argv = sys.argv[1:] if argv is None else list(argv)
    if presets is None:
        return tyro.cli(cls, args=argv)
    flags = [i for i, a in enumerate(argv[:-1]) if a == "--preset"]
    name = argv[flags[-1] + 1] if flags else None
    if name is not None and name not in presets:
        raise UsageError(f"unknown preset {name!r}; choose one of {', '.join(presets)}")
    default = replace(cls(), preset=name, **presets.get(name, {}))
    return tyro.cli(cls, default=default, args=argv)


def run(main, cls, presets=None, argv=None):
    """Every script's entry point: parse the command line, run `main(args)`; a user error ends with one line
    on stderr (from rank 0 under torchrun) and exit code 1, never a traceback."""
    try:
        main(cli(cls, presets, argv))
    except UsageError as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def print0(*args, **kwargs):
    """print, from rank 0 only: every rank runs the same script and one of them talks."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs)


def seed_for(*keys: int) -> int:
    """A well-mixed 32-bit seed from integer keys: (seed, j) pairs never collide as seed + j would."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


# ----------------------------------------------------------------------------- devices and ranks
def autocast(device):
    """bf16 compute on CUDA with fp32 master weights; plain fp32 on CPU (where bf16 would only be slow)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def setup_distributed(args):
    """torchrun sets RANK/WORLD_SIZE; plain python is world size 1. gloo on CPU, nccl on CUDA."""
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    return torch.device(device), rank, world


def shard(transformer, device):
    """FSDP2: a shard group per transformer block, then the root; bf16 compute, fp32 master and reduction."""
    import warnings

    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # diffusers' blocks return views (a split of the joint sequence) but never modify them in place; checked:
    # sharded gradients match unsharded ones to 2e-9 on the tiny FLUX model, so FSDP2's warning is noise here.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mp = MixedPrecisionPolicy()
    if device.type == "cuda":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for name in ("transformer_blocks", "single_transformer_blocks"):
        for block in getattr(transformer, name, []):
            fully_shard(block, mp_policy=mp)
    fully_shard(transformer, mp_policy=mp)


def reduce_mean(values, device):
    """Means over all ranks of a dict of floats (every rank contributes equally: same N per rank)."""
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return dict(zip(values, t.tolist(), strict=True))


def gather(x):
    """All ranks' rows of x (N, ...) -> (world*N, ...), for metrics over the whole batch."""
    if not dist.is_initialized():
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def gather_objects(obj):
    """Every rank's picklable `obj`, as a list ordered by rank (world size 1: [obj])."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------- prompts
class PromptSource:
    """The prompts of every script: a text file (one prompt a line, blank lines skipped) or the toy grammar.

    Specs: FILE, `toy:train`, `toy:heldout`, or `toy`, the split the script is for (`toy_split`: train for the
    trainers, held-out for eval.py and chunking.py). Training draws a fresh batch each iteration (`draw`);
    evaluation reads a fixed list (`head`): a file's lines in order, or the toy grammar's list of seed 1, the
    held-out prompts `python toy_model.py --eval-only` scores (fixed: a script's --seed varies the noise, not
    the benchmark).
    """

    TOY_LIST_SEED = 1
    TOY_LIST_SIZE = 250  # the toy list's length when none is asked for

    def __init__(self, spec: str, toy_split: str = "train"):
        self.spec, self.lines = spec, None
        if spec in ("toy", "toy:train", "toy:heldout"):
            self.split = toy_split if spec == "toy" else spec.split(":")[1]
            return
        self.split = None
        if not Path(spec).is_file():
            raise UsageError(
                f"prompts file {spec!r} not found; pass --prompts FILE (one prompt per line) or --prompts toy"
            )
        try:
            text = Path(spec).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UsageError(
                f"prompts file {spec!r} is not UTF-8 text; it needs one prompt per line"
            ) from None
        self.lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not self.lines:
            raise UsageError(f"prompts file {spec!r} has no prompts; it needs one prompt per line")

    @property
    def is_toy(self) -> bool:
        return self.lines is None

    def draw(self, n: int, seed: int) -> list[str]:
        """n prompts drawn afresh from the seed: distinct unless a file holds fewer than n."""
        if self.is_toy:
            return toy.sample_prompts(self.split, n, seed)
        g = torch.Generator().manual_seed(seed)
        if n <= len(self.lines):
            idx = torch.randperm(len(self.lines), generator=g)[:n]
        else:
            idx = torch.randint(len(self.lines), (n,), generator=g)
        return [self.lines[i] for i in idx.tolist()]

    def head(self, n: int | None = None) -> list[str]:
        """The first n prompts of the fixed list (all of a file's when n is None)."""
        if self.is_toy:
            return toy.sample_prompts(self.split, self.TOY_LIST_SIZE if n is None else n, self.TOY_LIST_SEED)
        return self.lines[:n]


# ----------------------------------------------------------------------------- checkpoints and logs
def checkpoints(output_dir):
    """Completed checkpoints, oldest first (an interrupted save is still named *.tmp and is ignored)."""
    return sorted(Path(output_dir, "checkpoints").glob("iter_[0-9][0-9][0-9][0-9][0-9]"))


def save_checkpoint(policy, optimizer, args, iteration, rank):
    """The transformer in diffusers format (fp32 master weights, loadable by from_pretrained), the optimizer,
    every rank's RNG state, the iteration and the args. Written to a temporary folder and renamed, so the
    newest
    checkpoint is never half-written."""
    from huggingface_hub import save_torch_state_dict
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    # Collective: every rank takes part in gathering the full (unsharded) state on CPU.
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd, optim_sd = get_state_dict(policy, optimizer, options=options)
    rng_states = gather_objects(torch.get_rng_state())  # one per rank: each draws its own prompts' noise
    if rank == 0:
        final = Path(args.output_dir, "checkpoints", f"iter_{iteration:05d}")
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        policy.save_config(tmp / "transformer")
        pattern = "diffusion_pytorch_model{suffix}.safetensors"  # the file names from_pretrained looks for
        save_torch_state_dict(model_sd, tmp / "transformer", filename_pattern=pattern)
        trainer = {"optimizer": optim_sd, "rng": rng_states, "iteration": iteration, "args": asdict(args)}
        torch.save(trainer, tmp / "trainer.pt")
        os.replace(tmp, final)
    if dist.is_initialized():
        dist.barrier()


def resume(policy, optimizer, output_dir, rank):
    """Load a run's newest checkpoint into policy and optimizer; the iteration to continue from (0: none)."""
    found = checkpoints(output_dir)
    return load_checkpoint(policy, optimizer, found[-1], rank) if found else 0


def load_checkpoint(policy, optimizer, path, rank):
    """Restore what save_checkpoint wrote; returns the iteration to continue from."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    model_sd = {}
    for f in sorted((path / "transformer").glob("*.safetensors")):
        model_sd.update(load_file(f))
    state = torch.load(path / "trainer.pt", weights_only=False)
    options = StateDictOptions(full_state_dict=True)
    set_state_dict(
        policy, optimizer, model_state_dict=model_sd, optim_state_dict=state["optimizer"], options=options
    )
    torch.set_rng_state(state["rng"][rank % len(state["rng"])])
    return state["iteration"]


class Logger:
    """metrics.jsonl (+ wandb) on rank 0; every other rank gets `Logger(None)`, which does nothing."""

    def __init__(self, args, start):
        self.path = None if args is None else Path(args.output_dir, "metrics.jsonl")
        self.run = None
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        kept = [
            line for line in lines if json.loads(line)["iteration"] <= start
        ]  # a resumed run redoes the rest
        self.path.write_text("".join(line + "\n" for line in kept))
        if args.wandb:
            try:
                import wandb
            except ImportError:
                raise UsageError("--wandb needs the wandb package: pip install wandb") from None
            self.run = wandb.init(project="chunk-grpo", config=asdict(args))

    def log(self, metrics):
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(metrics) + "\n")
        if self.run is not None:
            self.run.log(metrics, step=metrics["iteration"])


# ----------------------------------------------------------------------------- images
def to_pil(images):
    """(N, 3, H, W) in [0, 1] -> list of PIL images."""
    from PIL import Image

    arrays = (images.permute(0, 2, 3, 1).cpu().float().numpy() * 255).round().astype(np.uint8)  # (N, H, W, 3)
    return [Image.fromarray(a) for a in arrays]


def image_grid(images, captions=(), cols=None, scale=4):
    """A PIL grid of (N, 3, H, W) images in [0, 1], each upscaled `scale` times and captioned underneath."""
    from PIL import Image, ImageDraw

    tiles = [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in to_pil(images)]
    cols = cols or len(tiles)
    w, h = tiles[0].width, tiles[0].height
    pad = 24 if captions else 0
    rows = -(-len(tiles) // cols)
    grid = Image.new("RGB", (cols * w, rows * (h + pad)), "white")
    chars = w // 6  # characters per caption line (the default font is ~6 px wide)
    for i, tile in enumerate(tiles):
        x, y = (i % cols) * w, (i // cols) * (h + pad)
        grid.paste(tile, (x, y))
        if captions:  # two short lines under the tile, wrapped by characters
            text = str(captions[i])
            caption = text[:chars] + "\n" + text[chars : 2 * chars]
            ImageDraw.Draw(grid).multiline_text((x + 2, y + h + 1), caption, fill="black", spacing=1)
    return grid
