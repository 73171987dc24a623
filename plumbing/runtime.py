"""
Plumbing under every script: the user-error type and the one entry point that reports it, torchrun setup,
FSDP2 sharding, cross-rank reductions, seeds, the check of a run's output folder and image grids (prompts are
plumbing/prompts.py's, a run's checkpoints plumbing/checkpoints.py's and its log plumbing/metrics.py's).
Nothing here is part of the algorithm (train_grpo.py holds that), and it imports nothing of the project.
"""

import math
import os
import sys
from dataclasses import dataclass, fields, replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


class UsageError(Exception):
    """A mistake of the user's (a flag, a path, a file): scripts print its one-line message and exit 1."""


def cli(cls, presets=None, argv=None):
    """Parse argv into the dataclass `cls` with tyro. With `presets`, `--preset NAME` first switches the
    defaults wholesale (presets are plain Python values); the last `--preset` on the line wins."""
    import tyro

    argv = sys.argv[1:] if argv is None else list(argv)
    default = cls()
    if presets is not None:
        flags = [i for i, a in enumerate(argv[:-1]) if a == "--preset"]
        name = argv[flags[-1] + 1] if flags else None
        if name is not None and name not in presets:
            raise UsageError(f"unknown preset {name!r}; choose one of {', '.join(presets)}")
        default = replace(default, preset=name, **presets.get(name, {}))
    args = tyro.cli(cls, default=default, args=argv)
    check_flags(args)  # every script's numeric flags, before anything loads
    return args


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


# ----------------------------------------------------------------------------- flags
@dataclass(frozen=True)
class Range:
    """The values a numeric flag accepts, declared beside it: `lr: Annotated[float, Range("> 0")] = 1e-5`.
    check_flags tests every declared range right after parsing, so that a bad value ends with one line before
    anything loads; a tuple flag is checked per item, None ("unset") always passes, NaN and inf never do."""

    rule: str  # "> 0", ">= 0", ">= 1", ">= 2", "in (0, 1]", "in [0, 1)" or "a positive multiple of 16"

    def allows(self, value) -> bool:
        if not math.isfinite(value):
            return False
        if self.rule == "> 0":
            return value > 0
        if self.rule == ">= 0":
            return value >= 0
        if self.rule == "in (0, 1]":
            return 0 < value <= 1
        if self.rule == "in [0, 1)":
            return 0 <= value < 1
        if self.rule == "a positive multiple of 16":  # 8x VAE, then 2x2 patches (FLUX tokens, SD3 patches)
            return value > 0 and value % 16 == 0
        return value >= int(self.rule.split()[-1])  # ">= 1", ">= 2"


def declared_range(cls, name: str) -> Range | None:
    """The Range of field `name`, from the class that declares it (a subclass that only changes a default
    keeps its base's range)."""
    for klass in cls.__mro__:
        hint = vars(klass).get("__annotations__", {}).get(name)
        found = [m for m in getattr(hint, "__metadata__", ()) if isinstance(m, Range)]
        if found:
            return found[0]
    return None


def check_flags(args):
    """One line for the first flag of `args` outside its range (None, "unset", passes), and for a device this
    machine does not have."""
    for f in fields(args):
        allowed, value = declared_range(type(args), f.name), getattr(args, f.name)
        items = value if isinstance(value, tuple) else (value,)
        if allowed is not None and any(v is not None and not allowed.allows(v) for v in items):
            typed = " ".join(map(str, items))
            raise UsageError(f"--{f.name.replace('_', '-')} {typed}: must be {allowed.rule}")
    if getattr(args, "lora_rank", None) == 0 and (args.lora_alpha is not None or args.lora_targets):
        raise UsageError("--lora-alpha and --lora-targets shape a LoRA adapter; add --lora-rank R (R > 0)")
    device = getattr(args, "device", "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}, but this machine has no CUDA device; use --device cpu")
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise UsageError(f"--device {device}: choose auto, cpu or cuda")


def writable_dir(path) -> Path:
    """Create the folder if needed and prove it takes a file, or end with one line saying why not."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"cannot write to the output folder {str(path)!r} ({e.strerror or e})") from None
    return path


def seed_for(*keys: int) -> int:
    """A well-mixed 32-bit seed from integer keys: (seed, j) pairs never collide as seed + j would."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


# ----------------------------------------------------------------------------- devices and ranks
def autocast(device):
    """bf16 compute on CUDA with fp32 master weights; plain fp32 on CPU (where bf16 would only be slow)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def resolve_device(name: str) -> str:
    """--device as torch names it: auto is cuda where there is one, else cpu."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def setup_distributed(args):
    """torchrun sets RANK/WORLD_SIZE; plain python is world size 1. gloo on CPU, nccl on CUDA. A collective
    that waits `args.timeout` seconds for another rank (a hung or dead one) fails, and the job stops."""
    device = resolve_device(args.device)
    if "RANK" in os.environ:
        timeout = timedelta(seconds=args.timeout)
        dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=timeout)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
        # SDPA's cuDNN backend, which torch picks first on Hopper, returned NaN gradients on the toy model
        # and an illegal memory access in FLUX.1-dev's backward on an H200 (torch 2.11, cuDNN 9); known
        # defects of its bf16 backward (pytorch/pytorch#196678, NVIDIA/cudnn-frontend#1072). Flash and
        # memory-efficient attention serve the same shapes.
        torch.backends.cuda.enable_cudnn_sdp(False)
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


# ----------------------------------------------------------------------------- a run's output folder
def check_output_dir(args):
    """Refuse, before anything is written, an --output-dir that is not a writable folder, or one that holds a
    run (metrics.jsonl or checkpoints/) when --resume is not given. Rank 0 looks (it alone writes there) and
    every rank raises its verdict."""
    problem = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        problem = output_dir_problem(Path(args.output_dir), args.resume)
    problem = gather_objects(problem)[0]
    if problem is not None:
        raise UsageError(problem)


def output_dir_problem(out: Path, resume: bool) -> str | None:
    """What is wrong with `out` as a run's folder, in one line, or None (then `out` exists)."""
    if out.exists() and not out.is_dir():
        return f"--output-dir {out} is a file; pass a folder for the run's metrics, samples and checkpoints"
    if not resume and (Path(out, "metrics.jsonl").exists() or Path(out, "checkpoints").exists()):
        return (
            f"--output-dir {out} already holds a run (metrics.jsonl or checkpoints/); pass --resume to "
            f"continue it, or a new --output-dir"
        )
    try:
        writable_dir(out)  # the one sure test of writability (read-only mounts, ACLs, root)
    except UsageError as e:
        return str(e)
    return None


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
