"""
A run's folder on disk, and resuming a run without going wrong quietly. Of the project it imports only
plumbing/runtime.py and plumbing/lora.py.

    RUN/metrics.jsonl                        one JSON object per iteration (plumbing/metrics.py)
    RUN/checkpoints/iter_XXXXX/transformer/  the policy in diffusers format (from_pretrained loads it)
    RUN/checkpoints/iter_XXXXX/optimizer/    AdamW's state, one file per rank (torch.distributed.checkpoint)
    RUN/checkpoints/iter_XXXXX/lora/         instead, a LoRA run's adapter (load_lora_weights loads it)
    RUN/checkpoints/iter_XXXXX/ema/          with --ema-decay, the average of the weights, in the same format
    RUN/checkpoints/iter_XXXXX/trainer.pt    every rank's RNG state, iteration, args (weights_only); a LoRA
                                             run's optimizer, whole

A new run refuses a folder that already holds one (runtime.check_output_dir). A checkpoint is
written to iter_XXXXX.tmp and renamed, so a folder named iter_XXXXX was complete when it was renamed; a crash
of the machine can still leave its files truncated, so --resume reads the newest checkpoint and falls back to
the one before it, with a warning, when a file is missing or truncated. It then refuses a checkpoint saved
with other flags that define the run (RUN_FIELDS, the chunk flags, the world size) or with other weights than
the policy's, rather than splice two runs into one.
"""

import json
import os
import shutil
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.state_dict as dsd

from plumbing import lora
from plumbing.runtime import UsageError, gather_objects, print0

# The flags that define a run, with the objectives' own (chunk_*, num_chunks, awm_*: found by name in
# load_checkpoint); all others may change on --resume: run length, logging, memory (batch sizes, device) and
# the optimizer, whose lr, betas and weight decay from the command line replace the restored ones.
RUN_FIELDS = (
    "model prompts reward height width guidance_scale num_steps shift sde_mode eta prompts_per_rank "
    "num_generations init_same_noise timestep_fraction sde_window seed lora_rank lora_alpha lora_targets "
    "ema_decay"
).split()
OPTIMIZER_FIELDS = ("learning_rate", "adam_betas", "weight_decay")


class Unreadable(Exception):
    """A checkpoint with a missing, truncated or foreign file: resume skips it for the one before."""


def checkpoint_due(iteration: int, args) -> bool:
    """Whether a run saves a checkpoint after `iteration`: every --checkpoint-every, and the last one."""
    return iteration % args.checkpoint_every == 0 or iteration == args.num_iterations


def checkpoints(output_dir):
    """Completed checkpoints, oldest first (an interrupted save is still named *.tmp and is ignored)."""
    return sorted(Path(output_dir, "checkpoints").glob("iter_[0-9][0-9][0-9][0-9][0-9]"))


# ----------------------------------------------------------------------------- checkpoints
def loadable(value):
    """A value of args as weights_only can load it: str, int, float, bool, None, tuples of them (else str)."""
    if isinstance(value, list | tuple):
        return tuple(loadable(v) for v in value)
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def local_part(p):
    """This rank's part of a parameter: its shard under FSDP2 (a DTensor), else the tensor itself."""
    return p.to_local() if hasattr(p, "to_local") else p


def without_single_process_warning(dcp_call, state_dict, folder):
    """dcp.save or dcp.load; in one process (no process group) dcp works alone, but warns so on every call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp_call(state_dict, checkpoint_id=folder)


def save_checkpoint(policy, optimizer, args, iteration, rank, ema=None):
    """The transformer in diffusers format (fp32 master weights, loadable by from_pretrained), the optimizer,
    every rank's RNG state, the iteration and the args, and the average of the weights if `ema` (a
    plumbing.ema.WeightAverage) is given. Every rank writes its shard of the optimizer into a temporary folder
    that rank 0 then renames, so the newest checkpoint is never half-written."""
    # Collective, like the gathering below: every rank checks its own shards.
    ok = all(torch.isfinite(local_part(p)).all() for p in policy.parameters())
    finite = torch.tensor([float(ok)], device=next(policy.parameters()).device)  # nccl reduces CUDA tensors
    if dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not finite.item():
        raise UsageError(f"iteration {iteration}: the weights hold NaN or infinity; they were not saved")
    final = Path(args.output_dir, "checkpoints", f"iter_{iteration:05d}")
    tmp, stale = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # an interrupted save's
    barrier()  # no rank writes into tmp before it is emptied
    # A LoRA run is not sharded: its ranks hold the same adapter and optimizer (checked), so rank 0's are the
    # run's, saved whole. A full run's AdamW state (twice the fp32 weights) is saved sharded as it lies, each
    # rank its own file under optimizer/ (torch.distributed.checkpoint, as torchtitan does), so no process
    # ever holds all of it; only the weights are gathered, on rank 0, for the diffusers files (save_weights).
    adapter = lora.has_adapter(policy)
    if adapter and dist.is_initialized():
        lora.check_same_on_ranks([p for p in policy.parameters() if p.requires_grad])
    if not adapter:
        without_single_process_warning(
            dcp.save, {"optimizer": dsd.get_optimizer_state_dict(policy, optimizer)}, tmp / "optimizer"
        )
    save_policy(policy, tmp / ("lora" if adapter else "transformer"), rank)
    if ema is not None:
        with ema.swapped_in():  # the policy holds the average: saved by the same code, in the same format
            save_policy(policy, tmp / "ema", rank)
    rng_states = gather_objects(torch.get_rng_state())  # one per rank: each draws its own prompts' noise
    if rank == 0:
        run_args = {k: loadable(v) for k, v in asdict(args).items()}
        trainer = {"rng": rng_states, "iteration": iteration, "args": run_args}
        if adapter:
            trainer["optimizer"] = optimizer.state_dict()
        torch.save(trainer, tmp / "trainer.pt")
        # A folder of this name exists only if resume skipped it as unreadable: replace it, never merge.
        shutil.rmtree(stale, ignore_errors=True)
        if final.exists():
            os.replace(final, stale)
        os.replace(tmp, final)
        shutil.rmtree(stale, ignore_errors=True)
    barrier()


def save_policy(policy, folder, rank):
    """Collective: the trained weights where from_pretrained or load_lora_weights finds them, a LoRA run's
    adapter (rank 0's: the ranks' are the same) or the whole transformer."""
    if lora.has_adapter(policy):
        if rank == 0:
            lora.save_adapter(policy, folder)
        return
    save_weights(policy, folder, rank)
    if rank == 0:
        policy.save_config(folder)


def save_weights(policy, folder, rank, max_shard_size="5GB"):
    """Collective: the full weights in diffusers' safetensors layout (files of at most `max_shard_size`, an
    index when there are several), gathered a file at a time, so rank 0's CPU holds one file, not the whole
    model (FLUX: 48 GB). huggingface_hub's save_torch_state_dict, file by file."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    weights = policy.state_dict()  # under FSDP2, DTensors: the plan sees their full sizes
    pattern = "diffusion_pytorch_model{suffix}.safetensors"  # the file names from_pretrained looks for
    plan = split_torch_state_dict_into_shards(
        weights, filename_pattern=pattern, max_shard_size=max_shard_size
    )
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
    for filename, keys in plan.filename_to_tensors.items():
        part = {}
        for key in keys:
            tensor = weights[key]
            full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor  # all ranks gather
            if rank == 0:
                part[key] = full.detach().cpu()
        if rank == 0:
            save_file(part, folder / filename, metadata={"format": "pt"})
    if rank == 0 and plan.is_sharded:
        index = {"metadata": plan.metadata, "weight_map": plan.tensor_to_filename}
        Path(folder, pattern.format(suffix="") + ".index.json").write_text(json.dumps(index, indent=2))


def barrier():
    """Wait for every rank (under torchrun; one process has no one to wait for)."""
    if dist.is_initialized():
        dist.barrier()


def read_weights(path):
    """The weights of a checkpoint folder: a LoRA run's adapter (lora/, in peft's keys) or the transformer."""
    return read_policy(path / "lora" if (path / "lora").is_dir() else path / "transformer")


def read_policy(folder):
    """What save_policy wrote to `folder`: an adapter (in peft's keys) or the transformer's weights."""
    from safetensors.torch import load_file

    if (folder / lora.WEIGHTS).is_file():
        return lora.read_adapter(folder)
    index = folder / "diffusion_pytorch_model.safetensors.index.json"  # present when the weights are sharded
    json.loads((folder / "config.json").read_text())  # a missing or truncated config: Unreadable, below
    if index.exists():
        files = [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {folder}")
    return {k: v for f in files for k, v in load_file(f).items()}


def read_checkpoint(path):
    """(weights, trainer state) of a checkpoint folder; Unreadable if a file is missing or truncated."""
    try:
        model_sd = read_weights(path)
        state = torch.load(path / "trainer.pt", weights_only=True)
        missing = {"rng", "iteration", "args"} - set(state)
        if missing:
            raise KeyError(f"trainer.pt lacks {sorted(missing)}")
        if "optimizer" not in state:  # not a LoRA run's, nor saved before the optimizer was sharded
            check_shards(path / "optimizer")
        if state["args"].get("ema_decay"):  # added later: older checkpoints have no average
            state["ema"] = read_policy(path / "ema")
    except Exception as e:  # any failure to read is the same verdict: not this checkpoint
        lines = str(e).strip().splitlines()
        raise Unreadable(f"{type(e).__name__}: {lines[0][:120] if lines else ''}") from e
    return model_sd, state


def check_shards(folder):
    """Raise if a file the sharded optimizer's metadata names is missing or shorter than its entries need.
    (dcp's metadata is a pickle, as torch.distributed.checkpoint writes it: resume only runs you trust.)"""
    ends = {}
    for item in dcp.FileSystemReader(folder).read_metadata().storage_data.values():
        ends[item.relative_path] = max(ends.get(item.relative_path, 0), item.offset + item.length)
    for name, end in ends.items():
        if (folder / name).stat().st_size < end:
            raise EOFError(f"optimizer/{name} is truncated")


def newest_readable(found):
    """(path, weights, trainer state) of the newest checkpoint of `found` that reads, warning of those it
    skips; every rank must read the same one (the run folder is on a filesystem all ranks share)."""
    chosen, skipped = None, []
    for path in reversed(found):
        try:
            chosen = (path, *read_checkpoint(path))
            break
        except Unreadable as e:
            skipped.append(f"{path.name} ({e})")
    names = gather_objects(None if chosen is None else chosen[0].name)
    if len(set(names)) > 1:
        raise UsageError(f"ranks read different checkpoints {names}: put --output-dir on a shared filesystem")
    if chosen is None:
        raise UsageError(
            f"no readable checkpoint in {found[0].parent}: {'; '.join(skipped)}; "
            f"start afresh with a new --output-dir"
        )
    if skipped:
        print0(
            f"warning: unreadable checkpoint {'; '.join(skipped)}; resuming from {chosen[0].name}",
            file=sys.stderr,
        )
    return chosen


def as_typed(value) -> str:
    """A flag's value as it is typed on the command line."""
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def changed_flags(saved: dict, now: dict, fields) -> list[str]:
    """`--flag OLD -> NEW` for each of `fields` whose value differs between two args dicts."""
    absent = "(unset)"
    out = []
    for f in fields:
        old, new = saved.get(f, absent), now.get(f, absent)
        if old != new:
            out.append(f"--{f.replace('_', '-')} {as_typed(old)} -> {as_typed(new)}")
    return out


def weight_mismatch(saved: dict, policy) -> list[str]:
    """The checkpoint's weights against the policy's, by key and shape: the first of each kind of
    difference."""
    ours = lora.adapter_state(policy) if lora.has_adapter(policy) else policy.state_dict()
    expected = {k: tuple(v.shape) for k, v in ours.items()}  # DTensors: the full shape
    got = {k: tuple(v.shape) for k, v in saved.items()}
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    mismatched = [
        f"{k} of shape {list(got[k])}, not {list(s)}" for k, s in expected.items() if got.get(k, s) != s
    ]
    kinds = (("missing key", missing), ("unexpected key", unexpected), ("key", mismatched))
    return [f"{kind} {keys[0]} ({len(keys)} in all)" for kind, keys in kinds if keys]


def load_checkpoint(policy, optimizer, args, checkpoint, rank, ema=None):
    """Restore a checkpoint (path, weights, trainer state) after checking that it belongs to this run, and its
    average of the weights into `ema`; the optimizer then takes --learning-rate, --adam-betas and
    --weight-decay from args. The iteration."""
    path, model_sd, state = checkpoint
    now = {k: loadable(v) for k, v in asdict(args).items()}
    world = dist.get_world_size() if dist.is_initialized() else 1
    own = ("chunk_", "awm_", "num_chunks")  # the flags of an objective: train_chunk.py's, train_awm.py's
    objective_fields = sorted(f for f in {**state["args"], **now} if f.startswith(own))
    # Flags added later: a checkpoint saved before them ran with these values.
    older = {"lora_rank": 0, "lora_alpha": None, "lora_targets": (), "sde_window": 0, "ema_decay": 0}
    saved = older | state["args"]
    changed = changed_flags(saved, now, RUN_FIELDS + objective_fields)
    if len(state["rng"]) != world:
        changed.append(f"world size {len(state['rng'])} -> {world}")
    if changed:
        raise UsageError(
            f"--resume from {path} with flags that change the run: {', '.join(changed)}; resume with the "
            f"run's own flags, or start afresh with a new --output-dir"
        )
    mismatch = weight_mismatch(model_sd, policy)
    if mismatch:
        raise UsageError(
            f"{path} does not hold this policy's weights: {'; '.join(mismatch)}; "
            f"was it saved from another --model?"
        )
    set_policy(policy, model_sd)
    if ema is not None:
        with ema.swapped_in():  # the saved average goes into the policy, and from there into `ema`
            set_policy(policy, state["ema"])
    if lora.has_adapter(policy):  # not sharded: the optimizer loads as it is
        optimizer.load_state_dict(state["optimizer"])
    elif "optimizer" in state:  # saved whole in trainer.pt, before the optimizer was sharded
        full = dsd.StateDictOptions(full_state_dict=True)
        dsd.set_optimizer_state_dict(policy, optimizer, state["optimizer"], options=full)
    else:  # each rank its own part: its shards as they are now (a fresh AdamW: zeros), which dcp fills
        sharded = {"optimizer": dsd.get_optimizer_state_dict(policy, optimizer)}
        without_single_process_warning(dcp.load, sharded, path / "optimizer")
        dsd.set_optimizer_state_dict(policy, optimizer, sharded["optimizer"])
    torch.set_rng_state(state["rng"][rank])
    for group in optimizer.param_groups:
        group.update(lr=args.learning_rate, betas=tuple(args.adam_betas), weight_decay=args.weight_decay)
    if retuned := changed_flags(state["args"], now, OPTIMIZER_FIELDS):
        print0(f"optimizer from the command line: {', '.join(retuned)}")
    return state["iteration"]


def set_policy(policy, weights):
    """Put whole weights (a LoRA run's adapter, or the transformer) into the policy, each rank its shard."""
    if lora.has_adapter(policy):
        from peft.utils import set_peft_model_state_dict

        set_peft_model_state_dict(policy, weights)
    else:
        dsd.set_model_state_dict(policy, weights, options=dsd.StateDictOptions(full_state_dict=True))


def resume(policy, optimizer, args, rank, ema=None):
    """Load the run's newest readable checkpoint into policy, optimizer and `ema`; the iteration to continue
    from (0: the run has no checkpoint yet)."""
    found = checkpoints(args.output_dir)
    if not found:
        return 0
    return load_checkpoint(policy, optimizer, args, newest_readable(found), rank, ema)
