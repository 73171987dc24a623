"""
A tiny FLUX-class text-to-image model, pretrained from scratch on the toy world of plumbing/toy.py: the bundle
in assets/toy/ that every script loads as the model "toy" (models.load_model).

    python -m scripts.pretrain_toy              # rebuild assets/toy/ (~20 min, one core), samples.png
    python -m scripts.pretrain_toy --eval-only  # evaluate the committed bundle, held out (ODE, SDE)
    python -m scripts.pretrain_toy --steps 20 --eval-prompts 10 --output-dir /tmp/toy  # a smoke test, < 1 min

The build is deterministic in --seed (on one thread: more threads may reorder float sums).

The model is FLUX in miniature, built as FLUX is: an AutoencoderKL (diffusers' class, 0.23M parameters) maps
32x32x3 images to 8x8x4 latents, trained first on rendered scenes; a FluxTransformer2DModel over the latents
packed 2x2 into 16 tokens of 16 (FLUX's packing), conditioned by a 2-layer CLIP text encoder over a word-level
tokenizer of the grammar, both trained jointly from scratch by flow matching with FLUX's sigma convention on
the VAE's shifted and scaled latents, so models.latent_flow_model, the FLUX code path, samples and decodes it.
The loss is weighted up on latent pixels at object edges (`edge_weights`). `--latent-channels 0` builds the
earlier pixel-space bundle instead (64 tokens of 4x4 pixels, models.toy_images_to_latents, no VAE): four
times the tokens, so every forward costs ~2.6x as much (NOTES.md, issue 24).
"""

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FluxTransformer2DModel
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from tqdm import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

import sampler
from plumbing import models, toy
from plumbing.prompts import PromptSource
from plumbing.runtime import Range, UsageError, image_grid, run, writable_dir


@dataclass
class Args:
    seed: Annotated[int, Range(">= 0")] = 0
    """seed of the weights, the training scenes and the noise: the same seed rebuilds the same bundle"""
    output_dir: str = "assets/toy"
    """bundle folder: transformer/, text_encoder/, tokenizer/, toy_config.json, samples.png"""
    # --- pretraining ---
    latent_channels: Annotated[int, Range(">= 0")] = 4
    """channels of the VAE's 8x8 latent (FLUX packs 2x2 latent pixels into a token); 0: pixel space, no VAE"""
    vae_steps: Annotated[int, Range(">= 1")] = 2000
    """optimizer steps of the autoencoder (L1 + L2 reconstruction, a small KL), before the flow model's"""
    vae_width: Annotated[int, Range(">= 8")] = 16
    """channels of the VAE's first block (then twice that twice); a multiple of 8 (its group norms)"""
    steps: int = 6000
    """optimizer steps of flow matching"""
    batch_size: Annotated[int, Range(">= 1")] = 32
    """rendered scenes per step"""
    lr: Annotated[float, Range("> 0")] = 1e-3
    """peak AdamW learning rate (linear warmup over a tenth of the steps, at most 100, cosine decay to 10%)"""
    ema: Annotated[float, Range("in [0, 1)")] = 0.995
    """decay of the weights' moving average that is saved (smoother samples than the last iterate)"""
    edge_weight: Annotated[float, Range(">= 0")] = 4.0
    """extra loss weight on pixels at an object's edge, where its shape is drawn (0: plain flow matching)"""
    dim: int = 128
    """transformer width (heads of 32 channels)"""
    num_layers: Annotated[int, Range(">= 1")] = 2
    """FLUX double-stream (joint text/image) blocks"""
    num_single_layers: Annotated[int, Range(">= 0")] = 2
    """FLUX single-stream blocks"""
    text_dim: int = 64
    """CLIP text encoder width (2 layers, 2 heads)"""
    threads: Annotated[int, Range(">= 1")] = 1
    """CPU threads; one keeps the build bit-reproducible and is as fast as two on a shared machine"""
    # --- evaluation ---
    eval_prompts: Annotated[int, Range(">= 1")] = 250
    """held-out prompts scored per sampling mode after training"""
    eval_only: bool = False
    """skip training: evaluate the bundle already in --output-dir"""


MAX_LENGTH = 12  # tokens: the longest prompt has 10 words, plus EOS


def check(args: Args):
    """User errors, each as one line, before minutes of work."""
    if args.eval_only and not (Path(args.output_dir) / "toy_config.json").is_file():
        raise UsageError(
            f"no toy bundle in {args.output_dir!r} to evaluate (toy_config.json is missing); build one with "
            f"`python -m scripts.pretrain_toy --output-dir {args.output_dir}` or point --output-dir at one"
        )
    if not args.eval_only and args.steps < 10:
        raise UsageError(f"--steps is {args.steps}; it needs at least 10 (the warmup is a tenth of them)")
    if args.dim < 32 or args.dim % 32 != 0:
        raise UsageError(f"--dim is {args.dim}; it must be a positive multiple of 32 (heads of 32 channels)")
    if args.vae_width % 8 != 0:
        raise UsageError(f"--vae-width is {args.vae_width}; it must be a multiple of 8 (groups of its norms)")
    if args.text_dim < 2 or args.text_dim % 2 != 0:
        raise UsageError(f"--text-dim is {args.text_dim}; it must be even and positive (2 attention heads)")
    if not args.eval_only:
        writable_dir(args.output_dir)


def build_model(args: Args):
    """Fresh (transformer, text_encoder, tokenizer), seeded by torch.manual_seed by the caller."""
    # Word level over the grammar: ids 0-2 are [PAD], [EOS], [UNK]. EOS must not be id 2: CLIP treats
    # eos_token_id == 2 as the legacy "EOS is the largest id" and would pool the wrong token.
    vocab = {w: i for i, w in enumerate(["[PAD]", "[EOS]", "[UNK]", *toy.vocabulary()])}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A [EOS]", special_tokens=[("[EOS]", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        eos_token="[EOS]",
        unk_token="[UNK]",
        model_max_length=MAX_LENGTH,
    )
    text_config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=args.text_dim,
        intermediate_size=2 * args.text_dim,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_LENGTH,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
    )
    text_encoder = CLIPTextModel(text_config)
    channels = 4 * args.latent_channels or 48  # a token: 2x2 latent pixels, or 4x4 pixels without a VAE
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=channels,
        out_channels=channels,
        num_layers=args.num_layers,
        num_single_layers=args.num_single_layers,
        attention_head_dim=32,
        num_attention_heads=args.dim // 32,
        joint_attention_dim=args.text_dim,
        pooled_projection_dim=args.text_dim,
        guidance_embeds=False,
        axes_dims_rope=(8, 12, 12),  # RoPE over (text/image, row, col) ids; sums to the head dim
    )
    return transformer, text_encoder, tokenizer


def edge_weights(images, boost, latent_channels=0):
    """Per-element loss weights, packed like the latents: 1 + boost where a pixel's 3x3 neighbourhood changes
    colour, (N, 64, 48) on pixels; with a VAE, on each latent pixel whose 4x4 pixels hold an edge, (N, 16,
    4 C). The shape word only decides the ~16% of pixels along an object's edge; unweighted, the model learns
    colour and place and draws shapeless blobs (held-out reward 0.26 vs 0.31 with boost 4 at 1500 steps,
    scored by the verifier's old fill-ratio shape rule)."""
    spread = F.max_pool2d(images, 3, 1, 1) + F.max_pool2d(-images, 3, 1, 1)  # (N, 3, 32, 32): max - min
    edge = (spread.amax(1, keepdim=True) > 0.05).float()  # (N, 1, 32, 32)
    if latent_channels:
        w = 1 + boost * F.max_pool2d(edge, 4)  # (N, 1, 8, 8): a latent pixel covers 4x4 pixels
        return models.pack(w.expand(-1, latent_channels, -1, -1))  # (N, 16, 4 C)
    w = 1 + boost * edge  # (N, 1, 32, 32)
    # packed like the pixels, which toy_images_to_latents maps x -> 2x - 1: (w + 1) / 2 comes out as w
    return models.toy_images_to_latents((w.expand(-1, 3, -1, -1) + 1) / 2)  # (N, 64, 48)


def train_vae(args: Args, progress=True):
    """The toy's AutoencoderKL, 32x32x3 <-> 8x8xC, trained on rendered scenes (seeded by the caller), with
    FLUX's latent normalisation set from them: shift_factor their mean, scaling_factor one over their std."""
    w = args.vae_width
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 3,  # two downsamplings: 32 -> 8
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(w, 2 * w, 2 * w),
        latent_channels=args.latent_channels,
        norm_num_groups=8,
        sample_size=32,
        mid_block_add_attention=False,  # 8x8 latents need no attention to see the whole image
    )
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    warmup = min(100, args.vae_steps // 10 + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * (1 - 0.9 * i / args.vae_steps)
    )
    gen = torch.Generator().manual_seed(args.seed + 1)
    for step in tqdm(range(args.vae_steps), desc="autoencoder", disable=not progress):
        key = args.seed * 1_000_003 + 500_000 + step  # scenes the flow model's steps never draw
        x = toy.render(toy.sample_prompts("train", args.batch_size, seed=key), seed=key) * 2 - 1
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        reconstruction = vae.decode(z).sample  # (B, 3, 32, 32)
        kl = posterior.kl().mean() / x[0].numel()  # per pixel value: a light touch, as SD's VAE
        loss = (reconstruction - x).abs().mean() + (reconstruction - x).square().mean() + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        x = toy.render(toy.sample_prompts("train", 512, seed=args.seed + 7), seed=args.seed + 7) * 2 - 1
        z = vae.encode(x).latent_dist.mean  # (512, C, 8, 8)
    vae.register_to_config(shift_factor=z.mean().item(), scaling_factor=1 / z.std().item())
    return vae


def to_latents(vae, images):
    """What the flow model learns to generate: images (N, 3, 32, 32) in [0, 1] -> (N, 64, 48) pixel tokens,
    or the VAE's normalised posterior means packed as FLUX packs them, (N, 16, 4 C)."""
    if vae is None:
        return models.toy_images_to_latents(images)
    with torch.no_grad():
        z = vae.encode(images * 2 - 1).latent_dist.mean  # (N, C, 8, 8)
    return models.pack((z - vae.config.shift_factor) * vae.config.scaling_factor)


def pretrain(args: Args, progress=True):
    """The autoencoder (unless --latent-channels 0), then flow matching from scratch, text encoder and
    transformer jointly. Returns (the sampler's FlowModel, text_encoder, tokenizer, vae or None), the flow
    model's weights replaced by their moving average."""
    torch.manual_seed(args.seed)
    vae = train_vae(args, progress) if args.latent_channels else None
    transformer, text_encoder, tokenizer = build_model(args)
    model = models.toy_flow_model(transformer, text_encoder, tokenizer, MAX_LENGTH, vae=vae)
    params = [*transformer.parameters(), *text_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    warmup = min(100, args.steps // 10)

    def lr_factor(i):  # linear warmup, then a cosine from 1 down to 0.1 at the last step
        return min((i + 1) / warmup, 0.55 + 0.45 * np.cos(np.pi * i / args.steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    gen = torch.Generator().manual_seed(args.seed)
    ema = [q.detach().clone() for q in params]  # an exponential moving average of the weights is what ships
    bar = tqdm(range(args.steps), desc="pretrain", disable=not progress)
    for step in bar:
        prompts = toy.sample_prompts("train", args.batch_size, seed=args.seed * 1_000_003 + step)
        images = toy.render(prompts, seed=args.seed * 1_000_003 + step)  # (B, 3, 32, 32)
        x0 = to_latents(vae, images)  # (B, L, C): 64 pixel tokens of 48, or 16 latent tokens of 4 C
        eps = torch.randn(x0.shape, generator=gen)  # (B, L, C)
        # s ~ U(0, 1) covers every sigma of the shift-3 schedule. Not the shifted logit-normal: it would
        # rarely train s < 0.4, where the last steps draw the edges the verifier judges.
        s = torch.rand(args.batch_size, generator=gen)  # (B,)
        xs = (1 - s[:, None, None]) * x0 + s[:, None, None] * eps  # (B, L, C): x_s = (1-s) x0 + s eps
        v = model.velocity(transformer, xs, s, model.encode_prompts(prompts))  # (B, L, C)
        w = edge_weights(images, args.edge_weight, args.latent_channels)  # (B, L, C)
        loss = ((v - (eps - x0)).square() * w).mean() / w.mean()  # the target velocity is eps - x0
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(args.ema, step / (step + 10))  # ramps up, so the random init fades from the average fast
        torch._foreach_lerp_(ema, [q.detach() for q in params], 1 - decay)
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    torch._foreach_copy_([q.data for q in params], ema)
    return model, text_encoder, tokenizer, vae


def evaluate(model, prompts, *, mode, seed=0):
    """Sample one image per prompt with the training schedule (17 steps, shift 3, the mode's own eta).
    Returns (images, verdict, table), the table {category or "all": (mean score, strict accuracy)}."""
    sampling = sampler.sampling_settings(sampler.mode_defaults(sampler.SamplingArgs(sde_mode=mode)), model)
    traj = sampler.rollout(model, prompts, num_generations=1, seed=seed, batch_size=128, **sampling)
    verdict = toy.verify(traj.images, prompts)
    categories = [toy.category(p) for p in prompts]
    table = {}
    for c in toy.CATEGORIES:
        idx = torch.tensor([k == c for k in categories])  # (N,) bool: the prompts of category c
        if idx.any():
            table[c] = (verdict.score[idx].mean().item(), verdict.strict[idx].float().mean().item())
    table["all"] = (verdict.score.mean().item(), verdict.strict.float().mean().item())
    return traj.images, verdict, table


def main(args: Args):
    check(args)
    torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    if not args.eval_only:
        t0 = time.time()
        model, text_encoder, tokenizer, vae = pretrain(args)
        minutes = (time.time() - t0) / 60
        out.mkdir(parents=True, exist_ok=True)
        model.transformer.save_pretrained(out / "transformer")  # safetensors, the libraries' own formats
        text_encoder.save_pretrained(out / "text_encoder")
        tokenizer.save_pretrained(out / "tokenizer")
        if vae is not None:
            vae.save_pretrained(out / "vae")
        elif (out / "vae").is_dir():
            shutil.rmtree(out / "vae")  # a pixel-space bundle has none: models.load_toy would load it
        config = {"image_size": 32, "max_length": MAX_LENGTH, "latent_channels": args.latent_channels}
        (out / "toy_config.json").write_text(json.dumps(config) + "\n")
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
        print(f"pretrained in {minutes:.1f} min; bundle {out} is {size:.2f} MB")
    model = models.load_model(str(out))  # evaluate what was saved, through the loading code trainers use
    model.transformer.eval()
    prompts = PromptSource("toy:heldout").head(args.eval_prompts)  # the list eval.py --preset toy scores
    for mode in ("ode", "flow"):
        _, _, table = evaluate(model, prompts, mode=mode, seed=args.seed)
        scores = "  ".join(f"{c} {s:.3f}/{a:.2f}" for c, (s, a) in table.items())
        print(f"held-out, {mode:4s} 17 steps shift 3: {scores}   (mean reward / strict accuracy)")
    # The grid: two held-out prompts per category, four samples each (flow SDE, the policy RL starts from).
    grid_prompts = []
    for c in toy.CATEGORIES:
        grid_prompts += [p for p in prompts if toy.category(p) == c][:2]
    traj = sampler.rollout(model, grid_prompts, num_generations=4, seed=args.seed)  # images (4 P, 3, 32, 32)
    captions = [p for p in grid_prompts for _ in range(4)]
    image_grid(traj.images, captions, cols=4, scale=3).save(out / "samples.png")


if __name__ == "__main__":
    run(main, Args)
