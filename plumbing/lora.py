"""
LoRA for one-GPU runs, through peft as diffusers itself uses it (`transformer.add_adapter(LoraConfig(...))`):
the base weights stay frozen in the model's compute dtype (bf16 on CUDA, fp32 on CPU) and only the low-rank
adapter, kept in fp32, is trained. Of the project it imports only plumbing/runtime.py.

    W x  ->  W x + (alpha / r) B A x,   A: (r, in), B: (out, r), B = 0 at the start (so the policy starts as
                                        the base model and ratio == 1 holds on the first step)

The KL reference of a LoRA run is the same transformer with its adapter switched off (`AdapterOff`), not a
second copy. Under torchrun every rank holds the whole frozen base (no FSDP) and the adapter's gradients
are averaged across ranks before clipping (`average_gradients`), as DDP would. A checkpoint's adapter is
written in the diffusers LoRA format (`lora/pytorch_lora_weights.safetensors`, with its LoraConfig as
metadata), which the stock `FluxPipeline.load_lora_weights` / `StableDiffusion3Pipeline.load_lora_weights`
read.
"""

from pathlib import Path

import torch
import torch.distributed as dist

from plumbing.runtime import UsageError

# Flow-GRPO's SD3.5 targets (scripts/train_sd3.py, r 32, alpha 64, gaussian init): every attention
# projection of the joint blocks, image side (to_q/k/v, to_out.0) and text side (add_q/k/v_proj, to_add_out).
# peft matches a name as a suffix, so on FLUX the same list also takes the single blocks' attn.to_q/k/v
# (their output goes through proj_out, shared with the MLP, which is left alone): FLUX's defaults are the
# same names.
DEFAULT_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)
WEIGHTS = "pytorch_lora_weights.safetensors"  # the file name load_lora_weights looks for


def require_peft():
    try:
        import peft  # noqa: F401
    except ImportError:
        raise UsageError("LoRA needs the peft package: pip install peft==0.21.2") from None


def add_lora(transformer, rank: int, alpha: float | None, targets=()):
    """Freeze `transformer` and give it a trainable fp32 LoRA adapter; the adapter's parameters, a list.
    alpha None: 2 x rank (Flow-GRPO's 64 for rank 32); targets empty: DEFAULT_TARGETS."""
    require_peft()
    from peft import LoraConfig

    transformer.requires_grad_(False)
    alpha = 2 * rank if alpha is None else alpha
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        init_lora_weights="gaussian",
        target_modules=list(targets or DEFAULT_TARGETS),
    )
    try:
        transformer.add_adapter(config)
    except ValueError as e:  # peft: a target module that the transformer does not have
        raise UsageError(f"--lora-targets {' '.join(targets)}: {str(e).splitlines()[0][:200]}") from None
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # fp32 adapter on a bf16 base: peft casts the input to the adapter's dtype
    return params


def has_adapter(transformer) -> bool:
    return bool(getattr(transformer, "peft_config", None))


class AdapterOff:
    """The base model of a LoRA transformer, callable like a transformer: the adapter is off for the call."""

    def __init__(self, transformer):
        self.transformer = transformer

    def __call__(self, *args, **kwargs):
        self.transformer.disable_adapters()
        try:
            return self.transformer(*args, **kwargs)
        finally:
            self.transformer.enable_adapters()  # and trainable again: peft froze it while it was off


def average_gradients(params):
    """Average the adapter's gradients over ranks, in one all-reduce (the adapter is small)."""
    world = dist.get_world_size()
    flat = torch.cat([p.grad.flatten() for p in params])  # (P,) every adapter parameter's gradient
    dist.all_reduce(flat)
    flat /= world
    for p, g in zip(params, flat.split([p.numel() for p in params]), strict=True):
        p.grad.copy_(g.view_as(p.grad))


def check_same_on_ranks(params):
    """Raise if any rank's adapter differs from the others' by a single bit (all-reduced MAX == MIN)."""
    flat = torch.cat([p.detach().flatten() for p in params])  # (P,)
    high, low = flat.clone(), flat.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    if not torch.equal(high, low):
        raise RuntimeError("the ranks' LoRA adapters differ; their gradients were not averaged")


def adapter_state(transformer) -> dict:
    """The adapter's weights in peft's keys (`...attn.to_q.lora_A.weight`), on the CPU."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().cpu() for k, v in get_peft_model_state_dict(transformer).items()}


def save_adapter(transformer, folder):
    """The adapter in the diffusers LoRA format, with its LoraConfig (rank, alpha, targets) as metadata."""
    import diffusers

    pipe = diffusers.FluxPipeline
    if type(transformer).__name__.startswith("SD3"):
        pipe = diffusers.StableDiffusion3Pipeline
    metadata = transformer.peft_config["default"].to_dict()
    pipe.save_lora_weights(
        folder, transformer_lora_layers=adapter_state(transformer), transformer_lora_adapter_metadata=metadata
    )


def read_adapter(folder) -> dict:
    """A saved adapter's weights in peft's keys (the inverse of save_adapter's renaming)."""
    from safetensors.torch import load_file

    saved = load_file(Path(folder, WEIGHTS))
    return {k.removeprefix("transformer."): v for k, v in saved.items()}


def load_adapter(transformer, folder):
    """Put a saved adapter (a checkpoint's lora/ folder) on `transformer`, named "default"."""
    require_peft()
    transformer.load_lora_adapter(str(folder), weight_name=WEIGHTS, adapter_name="default")
