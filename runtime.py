"""
Plumbing shared by the trainers and eval.py: torchrun setup, FSDP2 sharding, cross-rank reductions, prompt sources,
atomic checkpoints and the rank-0 logger. Nothing here is part of the algorithm; train_grpo.py holds that.
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

from sampler import UsageError

def autocast(device):
    """bf16 compute on CUDA with fp32 master weights; plain fp32 on CPU (where bf16 would only be slow)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def setup_distributed(args):
    """torchrun sets RANK/WORLD_SIZE; plain python is world size 1. gloo on CPU, nccl on CUDA."""
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    return torch.device(device), rank, world


def shard(transformer, device):
    """FSDP2: one shard group per transformer block, then the root; bf16 compute, fp32 master and reduction."""
    import warnings
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    # diffusers' blocks return views (a split of the joint sequence) but never modify them in place; checked: sharded
    # gradients match unsharded ones to 2e-9 on the tiny FLUX model, so FSDP2's warning about it is noise here.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" \
        else MixedPrecisionPolicy()
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
    return dict(zip(values, t.tolist()))


def gather(x):
    """All ranks' rows of x (N, ...) -> (world*N, ...), for metrics over the whole batch."""
    if not dist.is_initialized():
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


class PromptSource:
    """Prompts from a text file (one per line) or the toy grammar, drawn afresh each iteration from a seed."""

    def __init__(self, spec):
        self.spec, self.lines = spec, None
        if spec != "toy":
            if not Path(spec).is_file():
                raise UsageError(f"prompts file {spec!r} not found; pass --prompts FILE (one prompt per line) "
                                 f"or --prompts toy")
            self.lines = [line.strip() for line in Path(spec).read_text().splitlines() if line.strip()]
            if not self.lines:
                raise UsageError(f"prompts file {spec!r} has no prompts; it needs one prompt per line")

    def draw(self, n, seed):
        """n distinct prompts (with replacement only when the file is smaller than n)."""
        if self.lines is None:
            from toy import sample_prompts
            return sample_prompts("train", n, seed)
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self.lines), generator=g)[:n] if n <= len(self.lines) \
            else torch.randint(len(self.lines), (n,), generator=g)
        return [self.lines[i] for i in idx.tolist()]


def checkpoints(output_dir):
    """Completed checkpoints, oldest first (an interrupted save is still named *.tmp and is ignored)."""
    return sorted(Path(output_dir, "checkpoints").glob("iter_[0-9][0-9][0-9][0-9][0-9]"))


def save_checkpoint(policy, optimizer, args, iteration, rank):
    """The transformer in diffusers format (fp32 master weights, loadable by from_pretrained) + optimizer, RNG states,
    iteration and args. Written to a temporary folder and renamed, so the newest checkpoint is never half-written."""
    from huggingface_hub import save_torch_state_dict
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    model_sd, optim_sd = get_state_dict(policy, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                     cpu_offload=True))
    rng = [None] * (dist.get_world_size() if dist.is_initialized() else 1)
    state = torch.get_rng_state()
    dist.all_gather_object(rng, state) if dist.is_initialized() else rng.__setitem__(0, state)
    if rank == 0:
        final = Path(args.output_dir, "checkpoints", f"iter_{iteration:05d}")
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        policy.save_config(tmp / "transformer")
        save_torch_state_dict(model_sd, tmp / "transformer",
                              filename_pattern="diffusion_pytorch_model{suffix}.safetensors")
        torch.save({"optimizer": optim_sd, "rng": rng, "iteration": iteration, "args": asdict(args)},
                   tmp / "trainer.pt")
        os.replace(tmp, final)
    if dist.is_initialized():
        dist.barrier()


def load_checkpoint(policy, optimizer, path, rank):
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    model_sd = {}
    for f in sorted((path / "transformer").glob("*.safetensors")):
        model_sd.update(load_file(f))
    state = torch.load(path / "trainer.pt", weights_only=False)
    set_state_dict(policy, optimizer, model_state_dict=model_sd, optim_state_dict=state["optimizer"],
                   options=StateDictOptions(full_state_dict=True))
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
        kept = [line for line in (self.path.read_text().splitlines() if self.path.exists() else [])
                if json.loads(line)["iteration"] <= start]  # a resumed run rewrites what it redoes
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



def preset_cli(cls, presets, argv=None):
    """tyro CLI whose defaults are switched wholesale by `--preset NAME` (presets are plain Python values)."""
    import tyro
    argv = sys.argv[1:] if argv is None else list(argv)
    name = next((argv[i + 1] for i in reversed(range(len(argv) - 1)) if argv[i] == "--preset"), None)  # last wins
    if name is not None and name not in presets:
        raise UsageError(f"unknown preset {name!r}; choose one of {', '.join(presets)}")
    return tyro.cli(cls, default=replace(cls(), preset=name, **presets.get(name, {})), args=argv)


def run(entry, parse):
    """Entry point shared by the trainers: user errors end with one line, not a traceback."""
    try:
        entry(parse())
    except UsageError as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


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
    w, h, pad = tiles[0].width, tiles[0].height, 24 if captions else 0
    grid = Image.new("RGB", (cols * w, -(-len(tiles) // cols) * (h + pad)), "white")
    for i, tile in enumerate(tiles):
        x, y = (i % cols) * w, (i // cols) * (h + pad)
        grid.paste(tile, (x, y))
        if captions:  # two short lines under the tile, wrapped by characters (the default font is ~6 px wide)
            text = str(captions[i])
            ImageDraw.Draw(grid).multiline_text((x + 2, y + h + 1), text[:w // 6] + "\n" + text[w // 6:2 * w // 6],
                                                fill="black", spacing=1)
    return grid
