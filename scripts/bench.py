"""
What a training iteration costs, phase by phase, against the compute it needs (as nanoGPT's bench.py).

    python -m scripts.bench                                        # CPU: the toy model's shapes, < 1 min
    python -m scripts.bench --model tiny                           # CPU: a tiny FLUX with a VAE, seconds
    python -m scripts.bench --model flux-dev --lora-rank 128       # 1 GPU: FLUX.1-dev at GCPO's shapes, LoRA
    python -m scripts.bench --model sd35-medium                    # 1 GPU: Flow-GRPO's SD3.5-M (LoRA r 32)
    torchrun --nproc_per_node 8 -m scripts.bench --model flux-dev  # 8 GPUs: GCPO's full fine-tune, FSDP2

Each model is a transformer of its published configuration with random weights, given random prompt embeddings
of the real shapes: nothing is downloaded and no text encoder runs (T5-XXL's 4.8 TFLOP for 512 tokens are
0.03% of a FLUX iteration; decoding, through the real VAE, 0.3%). The settings are the trainers' recipe for
the model (plumbing/recipes.py; flux-dev: GCPO's), changed by the flags. An iteration runs the trainers' code:
sampler.rollout, random rewards through compute_advantages, the step, chunk or AWM objective, clipping and
AdamW. After each timed phase its compute floor runs: the transformer passes it needs and nothing else
(rollout: num_steps forwards of each rollout batch; train: forward + backward of the transitions trained,
--train-batch-size at a time, and the KL reference's forward), so wall/floor prices all the rest. FLOPs:
torch's FlopCounterMode on one row, without recomputation (the usual MFU convention).
"""

import itertools
import time
from collections import namedtuple
from copy import deepcopy
from dataclasses import dataclass, fields, replace
from functools import partial
from statistics import median
from typing import Annotated, Literal

import torch
import torch.distributed as dist
from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel

import train_awm
import train_chunk
import train_grpo
from plumbing import lora, recipes
from plumbing.models import FlowModel, latent_flow_model
from plumbing.runtime import Range, UsageError, autocast, print0, run, seed_for, setup_distributed
from sampler import mode_defaults, rollout, sampling_settings

# The transformers. FLUX.1-dev: black-forest-labs/FLUX.1-dev transformer/config.json. SD3.5-M:
# stabilityai/stable-diffusion-3.5-medium transformer/config.json, as copied into public test code (two
# independent copies agree: 24 layers, dual attention in the first 13, RMS q/k norm, 2.24B parameters).
TOY = dict(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=32, num_attention_heads=4)
TOY |= dict(joint_attention_dim=64, pooled_projection_dim=64, axes_dims_rope=(8, 12, 12))  # assets/toy
TINY = dict(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2)
TINY |= dict(joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
FLUX_DEV = dict(in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128)
FLUX_DEV |= dict(num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768)
FLUX_DEV |= dict(guidance_embeds=True, axes_dims_rope=(16, 56, 56))
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24)
SD35_MEDIUM |= dict(attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096)
SD35_MEDIUM |= dict(caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384)
SD35_MEDIUM |= dict(dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
# The VAEs (vae/config.json of both repos: the same 16-channel autoencoder, different latent scaling).
FLUX_VAE = dict(latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2)
FLUX_VAE |= dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
FLUX_VAE |= dict(use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)
SD35_VAE = FLUX_VAE | dict(scaling_factor=1.5305, shift_factor=0.0609)
TOY_VAE = dict(latent_channels=4, block_out_channels=(16, 32, 32), norm_num_groups=8)  # assets/toy/vae
TOY_VAE |= dict(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
TOY_VAE |= dict(mid_block_add_attention=False)
TINY_VAE = dict(latent_channels=4, block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4)
TINY_VAE |= dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
# family: "flux" (the toy too: a FLUX transformer on a VAE's packed latents) or "sd3"; text: the prompt
# embeddings' tokens, width and pooled width; recipe: the trainers' preset whose settings it runs.
Size = namedtuple("Size", "family transformer vae text recipe")
TINY_RUN = dict(prompts_per_rank=2, num_generations=4, num_steps=6, rollout_batch_size=8, train_batch_size=4)
TINY_RUN |= dict(gradient_accumulation_steps=4, chunk_layout="uniform", chunk_size=2)
TINY_RUN |= dict(timestep_fraction=0.5)  # step and AWM draw 2 of the 5 steps: draws to test
MODELS = {
    "toy": Size("flux", TOY, TOY_VAE, (12, 64, 64), recipes.CHUNK["toy"]),
    "tiny": Size("flux", TINY, TINY_VAE, (8, 32, 32), recipes.CHUNK["toy"] | TINY_RUN),  # FLUX's path, fast
    "flux-dev": Size("flux", FLUX_DEV, FLUX_VAE, (512, 4096, 768), {}),  # 512 T5 tokens, CLIP-L's pooled 768
    # 77 CLIP + 256 T5 tokens (StableDiffusion3Pipeline's max_sequence_length), CLIP-L + CLIP-G pooled 2048
    "sd35-medium": Size("sd3", SD35_MEDIUM, SD35_VAE, (333, 4096, 2048), recipes.CHUNK["sd35"]),
}  # fmt: skip
# The datasheets' dense bf16 tensor-core peaks, TFLOP/s; the first key the device's name contains wins.
PEAK_TFLOPS = {"H100 PCIe": 756, "H100": 989, "H200": 989, "H800": 989, "B200": 2250, "A100": 312}
PEAK_TFLOPS |= {"A800": 312, "L40S": 362, "L4": 121, "RTX 4090": 165}


@dataclass
class Args:
    model: Literal["toy", "tiny", "flux-dev", "sd35-medium"] = "toy"
    """the architecture and recipe: toy and tiny run on a CPU, flux-dev and sd35-medium on GPUs"""
    objective: Literal["step", "chunk", "awm"] = "chunk"
    """step-level GRPO (train_grpo), chunk-level (train_chunk, the recipe's layout) or AWM (train_awm)"""
    iterations: Annotated[int, Range(">= 1")] = 2
    """timed iterations after an untimed one, each phase followed by its compute floor; the table: medians"""
    # --- shapes (unset: the recipe's) ---
    prompts_per_rank: Annotated[int | None, Range(">= 1")] = None
    """B: prompts per rank per iteration"""
    num_generations: Annotated[int | None, Range(">= 1")] = None
    """G: images per prompt"""
    num_steps: Annotated[int | None, Range(">= 2")] = None
    """denoising steps per trajectory"""
    height: Annotated[int | None, Range("a positive multiple of 16")] = None
    """image height in pixels (the toy's 32 are fixed)"""
    width: Annotated[int | None, Range("a positive multiple of 16")] = None
    """image width in pixels (the toy's 32 are fixed)"""
    rollout_batch_size: Annotated[int | None, Range(">= 1")] = None
    """trajectories per transformer forward while sampling"""
    train_batch_size: Annotated[int | None, Range(">= 1")] = None
    """transitions per transformer forward/backward while training"""
    gradient_accumulation_steps: Annotated[int | None, Range(">= 1")] = None
    """trajectories per optimizer step"""
    lora_rank: Annotated[int | None, Range(">= 0")] = None
    """0: full fine-tuning; r > 0: a rank-r LoRA on a frozen base (unset: the recipe's, sd35-medium's 32)"""
    lora_alpha: Annotated[float | None, Range("> 0")] = None
    """LoRA scale alpha; default 2 x rank"""
    lora_targets: tuple[str, ...] = ()
    """module names given an adapter; default lora.DEFAULT_TARGETS"""
    # --- system ---
    peak_tflops: Annotated[float | None, Range("> 0")] = None
    """the device's dense bf16 peak for MFU, TFLOP/s (default: PEAK_TFLOPS's entry for a known GPU)"""
    device: str = "auto"
    """cuda, cpu or auto (auto refuses flux-dev and sd35-medium on a CPU; --device cpu runs them anyway)"""


def build(size: Size, cls, t, device, dtype) -> FlowModel:
    """The FlowModel of a size: random weights and random prompt embeddings behind the model adapters."""
    with torch.device(device):  # initialised where it runs (a 12B init on a CPU takes minutes)
        transformer = cls(**size.transformer)  # fp32 master weights; a LoRA's frozen base in `dtype`
        vae = None if size.vae is None else AutoencoderKL(**size.vae).eval().requires_grad_(False)
    if dtype != torch.float32 and vae is not None:
        vae = vae.to(dtype)
    if dtype != torch.float32 and t.lora_rank:
        transformer = transformer.to(dtype)
    tokens, width, pooled = size.text
    shapes = {"prompt_embeds": (tokens, width), "pooled_prompt_embeds": (pooled,)}
    if size.family == "sd3" and t.guidance_scale > 1:  # classifier-free guidance: the negative prompt's too
        shapes |= {"negative_" + k: shape for k, shape in shapes.items()}

    def encode_prompts(prompts):  # in place of T5 and CLIP: random embeddings of their shapes, no cost
        return {k: torch.randn((len(prompts), *s), device=device, dtype=dtype) for k, s in shapes.items()}

    guidance = t.guidance_scale  # SD3's CFG scale, or FLUX's distilled guidance where it has the embedding
    if size.family == "flux" and not size.transformer.get("guidance_embeds"):
        guidance = None
    parts = (transformer, vae, encode_prompts, t.height, t.width, guidance)
    return latent_flow_model(size.family, *parts, device=device, dtype=dtype)


def clock(fn, device):
    """fn()'s result and its wall seconds, the device's queued work included."""
    torch.get_device_module(device).synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    torch.get_device_module(device).synchronize(device)
    return out, time.perf_counter() - t0


def counted(velocity, meter):
    """The velocity function, counting in meter["rows"] the rows computed with gradients: those trained."""

    def wrapper(transformer, latents, sigma, embeds):
        meter["rows"] = meter.get("rows", 0) + len(latents) * torch.is_grad_enabled()
        return velocity(transformer, latents, sigma, embeds)

    return wrapper


def passes(learner, embeds, rows, batch, repeats=1, train=True):
    """The transformer passes alone, `repeats` times over `rows` rows, `batch` at a time: forwards as in
    sampling, or forward + backward as in training (and the reference's forward under a KL term), the
    gradients thrown away. Each row is a random latent at a random sigma, with a prompt's embeddings."""
    m = learner.model
    for _, b in itertools.product(range(repeats), range(0, rows, batch)):
        n = min(batch, rows - b)
        x, sigma = torch.randn((n, *m.latent_shape), device=m.device), torch.rand(n, device=m.device)
        e = {k: v[torch.arange(n, device=v.device) % len(v)] for k, v in embeds.items()}  # (n, ...)
        with torch.set_grad_enabled(train), autocast(m.device):
            v = m.velocity(m.transformer, x, sigma, e)
        if train and learner.ref is not None:
            with torch.no_grad(), autocast(m.device):
                m.velocity(learner.ref, x, sigma, e)
        if train:
            v.float().mean().backward()
    m.transformer.zero_grad(set_to_none=True)


def count_flops(learner, embeds):
    """FLOPs of a sampled row's forward and of a trained transition's passes, counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as forward:
        passes(learner, embeds, 1, 1, train=False)
    with FlopCounterMode(display=False) as train:
        passes(learner, embeds, 1, 1)
    return forward.get_total_flops(), train.get_total_flops()


def iteration(it, learner, objective, optimizer, params, meter, sampling, floors):
    """One iteration as train_grpo.main runs it, its phases timed, each followed (with `floors`) by its
    compute floor: a dict of seconds, peak GB, trained rows and ratio_first."""
    t, model, out = learner.args, learner.model, {}
    policy, device, N = model.transformer, model.device, t.prompts_per_rank * t.num_generations
    keys = (it, dist.get_rank() if dist.is_initialized() else 0)  # of the seeds

    def phase(name, fn):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        meter.clear()
        result, out[name] = clock(fn, device)
        out.update(meter)
        if device.type == "cuda":
            out[f"{name} peak"] = torch.cuda.max_memory_allocated(device) / 1e9
        return result

    def optimizer_step():  # what train_grpo.main does after each objective call
        train_grpo.clip_gradients(params, t)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def train():  # train_grpo.main's inner loop, less its metrics and its skipping of non-finite steps
        policy.train()
        gen, ratios, out["optimizer"] = torch.Generator().manual_seed(seed_for(*keys, 1)), [], 0.0
        for rows in torch.randperm(N, generator=gen).to(device).split(t.gradient_accumulation_steps):
            ratios.append(objective(learner, traj, adv, kept, rows, 1.0 / len(rows), gen)[0])
            out["optimizer"] += clock(optimizer_step, device)[1]
        return ratios

    policy.eval()
    prompts = [f"prompt {p}" for p in range(t.prompts_per_rank)]  # read only by the random encode_prompts
    with autocast(device):
        traj = phase("rollout", lambda: rollout(model, prompts, seed=seed_for(*keys), **sampling))
    if floors:  # decoding timed again on its own, and the sampling's transformer forwards
        last = traj.latents[:, -1].split(t.rollout_batch_size)  # latents of the decoded shape
        out["decode"] = clock(lambda: [model.decode(x) for x in last], device)[1]
        rollout_passes = partial(passes, learner, traj.embeds, N, t.rollout_batch_size, t.num_steps, False)
        out["rollout floor"] = clock(rollout_passes, device)[1]
    rewards = torch.randn(N, generator=torch.Generator().manual_seed(seed_for(*keys, 2)))  # no reward model
    shaping = dict(adv_std=t.adv_std, slas_gamma=t.slas_gamma, adv_clip_max=t.adv_clip_max)
    advantages = partial(train_grpo.compute_advantages, rewards.to(device), traj.group, **shaping)
    adv = phase("reward", lambda: advantages()[0])  # (N,)
    kept = torch.ones(N, device=device)  # random rewards: every trajectory kept
    ratios = phase("train", train)
    if floors:
        rows = torch.tensor(out["rows"], device=device)  # as many on every rank: FSDP gathers in lockstep
        if dist.is_initialized():
            dist.all_reduce(rows, op=dist.ReduceOp.MAX)
        train_passes = partial(passes, learner, traj.embeds, int(rows), t.train_batch_size)
        out["train floor"] = clock(train_passes, device)[1]
    out["ratio_first"] = (ratios[0] - 1).abs().max().item()  # the first optimizer step's, before it updates
    return out


def table(results, N, t, flops, peak):
    """The table's lines: medians over the timed iterations."""
    med = {k: median(r[k] for r in results) for k in results[0]}
    med["iteration"] = med["rollout"] + med["reward"] + med["train"]
    med["iteration floor"] = med["rollout floor"] + med["train floor"]
    units = {"rollout": N * t.num_steps, "train": med["rows"]}  # transitions taken, transitions trained
    work = {"rollout": flops[0] * units["rollout"], "train": flops[1] * units["train"]}
    work["iteration"] = work["rollout"] + work["train"]
    columns = ("wall s", "floor s", "wall/floor", "peak GB", "images/s", "trans./s", "TFLOP/s", "MFU")
    lines = [f"{'phase':<12}" + "".join(f"{c:>11}" for c in columns)]
    for name in ("rollout", "  decode", "reward", "train", "  optimizer", "iteration"):
        wall, floor, mem = med[name.strip()], med.get(f"{name} floor"), med.get(f"{name} peak")
        cells = [f"{wall:.3f}", f"{floor:.3f}" if floor else "-", f"{wall / floor:.2f}" if floor else "-"]
        cells.append("-" if mem is None else f"{mem:.1f}")
        cells.append(f"{N / wall:.1f}" if name in work else "-")
        cells.append(f"{units[name] / wall:.0f}" if name in units else "-")
        cells.append(f"{work[name] / wall / 1e12:.3g}" if name in work else "-")
        cells.append(f"{work[name] / wall / 1e12 / peak:.1%}" if name in work and peak else "-")
        lines.append(f"{name:<12}" + "".join(f"{c:>11}" for c in cells))
    return lines


def main(args: Args):
    recipe = train_awm.AWMArgs if args.objective == "awm" else train_chunk.ChunkArgs  # the trainer's Args
    size, names = MODELS[args.model], {f.name for f in fields(recipe)} - {"model"}
    given = {k: v for k, v in vars(args).items() if v not in (None, ())}  # over the recipe
    t = mode_defaults(replace(recipe(), **{k: v for k, v in (size.recipe | given).items() if k in names}))
    device, rank, world = setup_distributed(t)
    cls = SD3Transformer2DModel if size.family == "sd3" else FluxTransformer2DModel
    if device.type == "cpu" and args.model in ("flux-dev", "sd35-medium") and args.device == "auto":
        with torch.device("meta"):  # counted without memory or time
            count = sum(p.numel() for p in cls(**size.transformer).parameters())
        raise UsageError(
            f"--model {args.model} is a {count / 1e9:.2f}B-parameter transformer ({count / 2.5e8:.0f} GB in "
            f"fp32) and this machine has no GPU; --device cpu runs it anyway (minutes per forward)"
        )
    inference_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # as the trainers
    torch.manual_seed(0)
    model = build(size, cls, t, device, inference_dtype)
    policy, ref, meter = model.transformer, None, {}
    if t.lora_rank:  # as train_grpo.main: a frozen base in `inference_dtype`, an fp32 adapter
        lora.add_lora(policy, t.lora_rank, t.lora_alpha, t.lora_targets)
    if t.beta > 0:
        ref = lora.AdapterOff(policy) if t.lora_rank else deepcopy(policy).requires_grad_(False).eval()
    learner = train_grpo.Learner(model, ref, t)
    flops = count_flops(learner, model.encode_prompts(["x"]))  # before checkpointing: no recomputation
    if t.gradient_checkpointing:
        policy.enable_gradient_checkpointing()
    train_grpo.shard_policy(policy, ref, t, device)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, betas=t.adam_betas, weight_decay=t.weight_decay)
    objective, describe = train_grpo.step_objective, train_grpo.describe_steps
    if args.objective == "chunk":
        objective = partial(train_chunk.chunk_objective, sizes=train_chunk.layout(t))
        describe = train_chunk.describe_chunks
    if args.objective == "awm":
        objective, describe = train_awm.awm_objective, train_awm.describe_awm
    model.velocity = counted(model.velocity, meter)
    peak, where = args.peak_tflops, f"cpu (threads: {torch.get_num_threads()})"
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
        peak = peak or next((v for k, v in PEAK_TFLOPS.items() if k in where), None)
    precision = "bf16 autocast, fp32 weights" if device.type == "cuda" else "fp32"
    if t.lora_rank:
        precision = f"{'bf16' if device.type == 'cuda' else 'fp32'} base, fp32 LoRA r {t.lora_rank}"
    N, trained = t.prompts_per_rank * t.num_generations, sum(p.numel() for p in params)  # DTensors: in full
    print0(f"bench {args.model}: {trained:,} parameters trained, {precision}; {where} x {world}")
    shape = f"{t.prompts_per_rank} prompts x {t.num_generations} images a rank, {t.num_steps} steps"
    batches = f"batches of {t.rollout_batch_size} (rollout), {t.train_batch_size} (train)"
    print0(f"{shape}, {t.height}x{t.width} px, {batches}")
    print0("\n".join(describe(t, t.num_steps - 1)))
    print0(f"FLOPs: {flops[0] / 1e9:.4g} G per sampled row, {flops[1] / 1e9:.4g} G per trained transition")
    # The schedule's values do not change the cost: the shift schedule for every model.
    sampling = sampling_settings(replace(t, schedule="shift"), model) | dict(batch_size=t.rollout_batch_size)
    sampling |= dict(num_generations=t.num_generations, init_same_noise=t.init_same_noise)
    results = []
    for it in range(1 + args.iterations):  # one untimed warmup iteration first (first calls, the allocator)
        results.append(iteration(it, learner, objective, optimizer, params, meter, sampling, floors=it > 0))
    ratio_first = torch.tensor(max(r.pop("ratio_first") for r in results), device=device)
    if dist.is_initialized():
        dist.all_reduce(ratio_first, op=dist.ReduceOp.MAX)
    print0("\n".join(table(results[1:], N, t, flops, peak)))
    print0(
        f"ratio_first {ratio_first.item():.1e}: max |ratio - 1| of each iteration's first optimizer step on "
        f"any rank, rollout batch {t.rollout_batch_size}, train batch {t.train_batch_size}, {precision}"
    )
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    run(main, Args)
