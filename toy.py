"""
The CPU-scale world: a shapes grammar, an exact renderer and verifier, and a tiny FLUX-class model pretrained on it.

    python toy.py                     # rebuild assets/toy/ from scratch (~10 min on a CPU), evaluate, samples.png
    python toy.py --eval-only         # evaluate the committed bundle on held-out prompts (ode and flow SDE)

The build is deterministic in --seed (on one thread: more threads may reorder float sums).

Scenes are coloured shapes on black, 32x32 pixels; prompts are plain English and fall into five GenEval-like
categories (`category()`):
    single_object  "a red circle"                      counting   "three yellow triangles"
    position       "a blue square on the left"         two_object "a red circle and a blue square"
    relation       "a green square above two purple circles"
`verify()` scores an image against its prompt exactly, with GenEval-style atoms: every object group is present
(colour and shape), has the exact count, sits in its region, and holds its relation to the other group. The score
is the fraction of atoms right (partial credit, the toy reward); `strict` is all of them right (GenEval accuracy).
Compositions (a scene up to surface form: "A left of B" is "B right of A") are split train / held-out by a hash,
so the held-out prompts test generalisation to unseen combinations of seen words.

The model is FLUX in miniature: a FluxTransformer2DModel over 64 tokens of 4x4 pixels (sampler.toy_images_to_latents),
conditioned by a 2-layer CLIP text encoder over a word-level tokenizer of the grammar, trained jointly from scratch
by flow matching with FLUX's sigma convention, so the sampler's FLUX adapter samples it unchanged. The loss is weighted
up along object edges (`edge_weights`); even so, 15 CPU minutes teach colour, place and rough count, not shape.
"""
import json
import random
import re
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class Args:
    seed: int = 0
    """seed of the weights, the training scenes and the noise: the same seed rebuilds the same bundle"""
    out: str = "assets/toy"
    """bundle folder (sampler.load_model("toy") reads assets/toy)"""
    # --- pretraining ---
    steps: int = 3000
    """optimizer steps of flow matching"""
    batch_size: int = 32
    """rendered scenes per step"""
    lr: float = 1e-3
    """peak AdamW learning rate (linear warmup, cosine decay to 10%)"""
    ema: float = 0.995
    """decay of the weights' moving average that is saved (smoother samples than the last iterate)"""
    edge_weight: float = 4.0
    """extra loss weight on pixels at an object's edge, where its shape is drawn (0: plain flow matching)"""
    dim: int = 96
    """transformer width (heads of 32 channels)"""
    num_layers: int = 2
    """FLUX double-stream (joint text/image) blocks"""
    num_single_layers: int = 2
    """FLUX single-stream blocks"""
    text_dim: int = 64
    """CLIP text encoder width (2 layers)"""
    threads: int = 1
    """CPU threads; one keeps the build bit-reproducible and is as fast as two on a shared machine"""
    # --- evaluation ---
    eval_prompts: int = 250
    """held-out prompts scored per sampling mode after training"""
    eval_only: bool = False
    """skip training: evaluate the bundle already in --out"""


# ----------------------------------------------------------------------------- the grammar
COLOURS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.7, 0.1), "blue": (0.1, 0.25, 0.95),
           "yellow": (0.95, 0.85, 0.1), "purple": (0.6, 0.1, 0.8), "cyan": (0.1, 0.8, 0.85)}  # >= 0.54 apart in RGB
SHAPES = ("circle", "square", "triangle")
NUMBERS = {1: "a", 2: "two", 3: "three", 4: "four"}
POSITIONS = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
             "centre": "in the centre"}
RELATIONS = ("to the left of", "to the right of", "above", "below")
CATEGORIES = ("single_object", "counting", "position", "two_object", "relation")
HELDOUT_BUCKETS = 4  # one composition in 4 is held out (zlib.crc32 of its canonical key)


class Scene(NamedTuple):
    category: str
    groups: tuple  # ((count, colour, shape), ...): one group, or two for two_object / relation
    where: str | None = None  # a POSITIONS key, a RELATIONS phrase (group 0 <rel> group 1), or None


def _phrase(count, colour, shape):
    return f"{NUMBERS[count]} {colour} {shape}{'s' if count > 1 else ''}"


def prompt_of(scene: Scene) -> str:
    a = _phrase(*scene.groups[0])
    if scene.category == "position":
        return f"{a} {POSITIONS[scene.where]}"
    if scene.category in ("two_object", "relation"):
        return f"{a} {'and' if scene.where is None else scene.where} {_phrase(*scene.groups[1])}"
    return a


_OBJ = rf"({'|'.join(NUMBERS.values())}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})s?"
_GLUE = "|".join(["and", *RELATIONS] + list(POSITIONS.values()))
_PROMPT = re.compile(rf"^{_OBJ}(?: ({_GLUE}))?(?: {_OBJ})?$")
_COUNT = {w: n for n, w in NUMBERS.items()}
_POSITION = {p: k for k, p in POSITIONS.items()}


def parse(prompt: str) -> Scene:
    """The inverse of prompt_of; raises ValueError on a sentence outside the grammar."""
    m = _PROMPT.match(prompt.strip().lower())
    glue, second = (m[4], m[5]) if m else (None, None)
    if m is None or (second is not None) != (glue in ("and", *RELATIONS)):
        raise ValueError(f"not a toy-grammar prompt: {prompt!r}")
    groups = ((_COUNT[m[1]], m[2], m[3]),) + (((_COUNT[m[5]], m[6], m[7]),) if m[5] else ())
    if m[4] in _POSITION:
        return Scene("position", groups, _POSITION[m[4]])
    if m[4] is not None:
        return Scene("two_object" if m[4] == "and" else "relation", groups, None if m[4] == "and" else m[4])
    return Scene("single_object" if groups[0][0] == 1 else "counting", groups)


def category(prompt: str) -> str:
    return parse(prompt).category


def composition(scene: Scene) -> tuple:
    """A scene up to surface form: group order of "and" and the direction of a relation do not matter."""
    g, where = scene.groups, scene.where
    if scene.category == "two_object":
        g = tuple(sorted(g))
    elif scene.category == "relation" and where in ("to the right of", "below"):
        g, where = g[::-1], {"to the right of": "to the left of", "below": "above"}[where]
    return (scene.category, g, where)


def split_of(scene: Scene) -> str:
    return "heldout" if zlib.crc32(repr(composition(scene)).encode()) % HELDOUT_BUCKETS == 0 else "train"


def random_scene(rng: random.Random, cat: str) -> Scene:
    """A scene of one category, attributes uniform; the two groups of a pair differ in colour or shape."""
    group = lambda n: (n, rng.choice(list(COLOURS)), rng.choice(SHAPES))  # noqa: E731
    if cat in ("single_object", "counting", "position"):
        n = rng.randint(2, 4) if cat == "counting" else 1
        return Scene(cat, (group(n),), rng.choice(list(POSITIONS)) if cat == "position" else None)
    while True:  # relation groups count one or two each: "a green square above two purple circles"
        a, b = (group(1), group(1)) if cat == "two_object" else (group(rng.randint(1, 2)), group(rng.randint(1, 2)))
        if a[1:] != b[1:]:
            return Scene(cat, (a, b), rng.choice(RELATIONS) if cat == "relation" else None)


def sample_prompts(split: str, n: int, seed: int) -> list[str]:
    """n prompts of one split ("train" | "heldout"), categories uniform, deterministic in seed."""
    assert split in ("train", "heldout"), split
    rng, out = random.Random(seed), []
    while len(out) < n:
        cat = rng.choice(CATEGORIES)
        while split_of(scene := random_scene(rng, cat)) != split:
            pass
        out.append(prompt_of(scene))
    return out


# ----------------------------------------------------------------------------- the renderer
# Bounding-box centres (pixels, 0..32) decide positions, for the renderer and the verifier alike (GenEval uses box
# centres too). A relation needs a 4-pixel margin so that "left of" is never a judgement call.
def in_region(cx, cy, pos):
    return {"left": cx <= 12, "right": cx >= 20, "top": cy <= 12, "bottom": cy >= 20,
            "centre": abs(cx - 16) <= 4 and abs(cy - 16) <= 4}[pos]


def related(a, b, rel):  # a, b: (cx, cy) box centres
    return {"to the left of": a[0] <= b[0] - 4, "to the right of": a[0] >= b[0] + 4,
            "above": a[1] <= b[1] - 4, "below": a[1] >= b[1] + 4}[rel]


def _template(shape, n):
    """An n x n mask, cropped to its pixels (a small circle loses its empty corner rows)."""
    u = np.arange(n) + 0.5 - n / 2
    y, x = np.meshgrid(u, u, indexing="ij")
    m = {"square": np.ones((n, n), bool), "circle": x**2 + y**2 <= (n / 2 - 0.1) ** 2,
         "triangle": np.abs(x) <= (y + n / 2) / 2 + 0.01}[shape]  # the triangle stands on its base, apex up
    rows, cols = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
    return m[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


SIZES = (9, 10, 11, 12)  # box sides in pixels: the size jitter
TEMPLATES = {(s, n): _template(s, n) for s in SHAPES for n in SIZES}


def _layout(scene: Scene, rng: random.Random):
    """Place every object by rejection sampling: inside the canvas, a 1-pixel gap between boxes (so objects never
    merge into one connected component), its region or relation satisfied. Returns [(colour, mask, y0, x0)]."""
    for _ in range(100):
        placed, boxes = [], []  # boxes: (y0, x0, h, w, group)
        for gi, (count, colour, shape) in enumerate(scene.groups):
            for _ in range(count):
                mask = TEMPLATES[shape, rng.choice(SIZES)]
                h, w = mask.shape
                for _ in range(200):
                    y0, x0 = rng.randint(1, 31 - h), rng.randint(1, 31 - w)
                    c = (x0 + w / 2, y0 + h / 2)
                    if any(y0 < by + bh + 1 and by < y0 + h + 1 and x0 < bx + bw + 1 and bx < x0 + w + 1
                           for by, bx, bh, bw, _ in boxes):
                        continue
                    if scene.category == "position" and not in_region(*c, scene.where):
                        continue
                    if scene.category == "relation" and gi == 1 and not all(
                            related((bx + bw / 2, by + bh / 2), c, scene.where) for by, bx, bh, bw, g in boxes if g == 0):
                        continue
                    break
                else:
                    break  # this object found no room: start the scene again
                placed.append((colour, mask, y0, x0))
                boxes.append((y0, x0, h, w, gi))
        if len(placed) == sum(g[0] for g in scene.groups):
            return placed
    raise RuntimeError(f"cannot lay out {prompt_of(scene)!r}")


def render(prompts: list[str], seed: int = 0) -> torch.Tensor:
    """Exact images of the prompts, (N, 3, 32, 32) in [0, 1]; image i depends only on (seed, i, prompt i)."""
    canvas = np.zeros((len(prompts), 32, 32, 3), np.float32)  # (N, H, W, 3), black background
    for i, p in enumerate(prompts):
        for colour, mask, y0, x0 in _layout(parse(p), random.Random(f"{seed}/{i}")):
            canvas[i, y0:y0 + mask.shape[0], x0:x0 + mask.shape[1]][mask] = COLOURS[colour]
    return torch.from_numpy(canvas).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32)


# ----------------------------------------------------------------------------- the verifier
COLOUR_TOL = 0.25  # a pixel takes the nearest palette colour within this RGB distance, else it is background
MIN_AREA = 6  # smaller components are specks, not objects (the smallest rendered object has 25 pixels)
WINDOW = 20  # side of the window, centred on a component's box, in which its shape is matched


def _shape_bank():
    """Every shape template, sides 7-14 (the rendered 9-12, give or take), moved by up to a pixel either way, in a
    WINDOW x WINDOW frame: (T, WINDOW**2) masks and the (T,) SHAPES index of each."""
    masks, shapes = [], []
    for k, shape in enumerate(SHAPES):
        for n in range(7, 15):
            m = torch.from_numpy(_template(shape, n))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    y0, x0 = WINDOW // 2 - m.shape[0] // 2 + dy, WINDOW // 2 - m.shape[1] // 2 + dx
                    frame = torch.zeros(WINDOW, WINDOW)
                    frame[y0:y0 + m.shape[0], x0:x0 + m.shape[1]] = m.float()
                    masks.append(frame.flatten())
                    shapes.append(k)
    return torch.stack(masks), torch.tensor(shapes)


SHAPE_BANK, SHAPE_OF = _shape_bank()


def _grow(label):
    """The max of each pixel's label and its 4 neighbours' (N, 1, H, W)."""
    p = F.pad(label, (1, 1, 1, 1))
    return torch.stack([label, p[..., :-2, 1:-1], p[..., 2:, 1:-1], p[..., 1:-1, :-2], p[..., 1:-1, 2:]]).amax(0)


def detect(images: torch.Tensor) -> list[list[tuple]]:
    """Objects in each image as (colour, shape, cx, cy): segment by colour, 4-connected components, and the shape
    whose template overlaps the component best."""
    n, _, h, w = images.shape
    palette = torch.tensor(list(COLOURS.values()))  # (K, 3)
    dist = (images.float()[:, None] - palette[None, :, :, None, None]).square().sum(2)  # (N, K, H, W)
    dmin, k = dist.min(1)  # (N, H, W)
    masks = (F.one_hot(k, len(COLOURS)).permute(0, 3, 1, 2) > 0) & (dmin < COLOUR_TOL**2)[:, None]  # (N, K, H, W)
    planes = masks.flatten(0, 1)  # (N*K, H, W): plane i is colour i % K of image i // K
    used = planes.flatten(1).any(1).nonzero()[:, 0]  # (U,) planes with any pixel of their colour
    # Connected components, vectorised: every pixel starts with its own label and takes the max of its 4-neighbourhood
    # inside its mask until nothing changes; each component ends up labelled by its largest pixel id. Not 8-connected:
    # a sample's stray pixel touching an object only at a corner would join it.
    mask = planes[used, None].float()  # (U, 1, H, W)
    label = torch.arange(1, h * w + 1, dtype=torch.float32).view(1, 1, h, w) * mask  # (U, 1, H, W)
    while not torch.equal(new := _grow(label) * mask, label):
        label = new
    plane, _, ys, xs = mask.nonzero(as_tuple=True)  # (P,) each: every foreground pixel
    key = used[plane] * (h * w + 1) + label[plane, 0, ys, xs].long()  # (P,) one value per component
    uniq, inv = torch.unique(key, return_inverse=True)  # (M,), (P,)
    area = torch.bincount(inv, minlength=len(uniq))  # (M,)
    y0, y1, x0, x1 = [torch.full((len(uniq),), fill).scatter_reduce(0, inv, v, red, include_self=True)
                      for v, red, fill in ((ys, "amin", h), (ys, "amax", -1), (xs, "amin", w), (xs, "amax", -1))]
    # Shape: the template of best intersection-over-union, a rendered object matching its own exactly. A rule on the
    # fill ratio (area / box) read a visibly right square with a few ragged edge pixels as a circle.
    mid_y, mid_x = (y0 + y1 + 1) // 2, (x0 + x1 + 1) // 2  # (M,) box centres, the windows' centres
    wy, wx = ys - mid_y[inv] + WINDOW // 2, xs - mid_x[inv] + WINDOW // 2  # (P,) each pixel in its component's window
    inside = (wy >= 0) & (wy < WINDOW) & (wx >= 0) & (wx < WINDOW)
    window = torch.zeros(len(uniq), WINDOW * WINDOW)  # (M, WINDOW**2)
    window[inv[inside], (wy * WINDOW + wx)[inside]] = 1.0
    overlap = window @ SHAPE_BANK.T  # (M, T)
    iou = overlap / (area[:, None] + SHAPE_BANK.sum(1) - overlap)  # (M, T); area counts pixels outside the window
    shape = SHAPE_OF[iou.argmax(1)]  # (M,) SHAPES index
    objects, names = [[] for _ in range(n)], list(COLOURS)
    for u, a, s, cx, cy in zip((uniq // (h * w + 1)).tolist(), area.tolist(), shape.tolist(),
                               ((x0 + x1 + 1) / 2).tolist(), ((y0 + y1 + 1) / 2).tolist()):
        if a >= MIN_AREA:  # u is the plane: image u // K, colour u % K
            objects[u // len(COLOURS)].append((names[u % len(COLOURS)], SHAPES[s], cx, cy))
    return objects


def atoms(scene: Scene, objects: list[tuple]) -> dict[str, bool]:
    """GenEval-style checks of one image's objects against its scene, by name."""
    found = [[(cx, cy) for c, s, cx, cy in objects if (c, s) == (colour, shape)] for _, colour, shape in scene.groups]
    out = {}
    for (count, colour, shape), boxes in zip(scene.groups, found):
        out[f"object: {colour} {shape}"] = len(boxes) > 0
        out[f"count: {count} {colour} {shape}"] = len(boxes) == count
        if scene.category == "position":
            out[f"position: {colour} {shape} {scene.where}"] = len(boxes) > 0 and all(
                in_region(*b, scene.where) for b in boxes)
    if scene.category == "relation":
        (_, c0, s0), (_, c1, s1) = scene.groups
        out[f"relation: {c0} {s0} {scene.where} {c1} {s1}"] = bool(found[0] and found[1]) and all(
            related(a, b, scene.where) for a in found[0] for b in found[1])
    return out


@dataclass
class Verdict:
    score: torch.Tensor  # (N,) float, fraction of atoms right: the toy reward
    strict: torch.Tensor  # (N,) bool, every atom right (GenEval accuracy)
    atoms: list  # N dicts atom name -> bool


def verify(images: torch.Tensor, prompts: list[str]) -> Verdict:
    """Score images (N, 3, 32, 32) in [0, 1] against their prompts exactly."""
    per_image = [atoms(parse(p), objs) for p, objs in zip(prompts, detect(images))]
    score = torch.tensor([sum(a.values()) / len(a) for a in per_image])  # (N,)
    return Verdict(score, torch.tensor([all(a.values()) for a in per_image]), per_image)


# ----------------------------------------------------------------------------- the model
MAX_LENGTH = 12  # tokens: the longest prompt has 10 words, plus EOS


def vocabulary() -> list[str]:
    words = {"and", *NUMBERS.values(), *COLOURS, *SHAPES, *(s + "s" for s in SHAPES)}
    return sorted(words.union(*(p.split() for p in (*POSITIONS.values(), *RELATIONS))))


def build_model(args: Args):
    """Fresh (transformer, text_encoder, tokenizer), seeded by torch.manual_seed by the caller."""
    from diffusers import FluxTransformer2DModel
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast
    # Word level over the grammar: ids 0-2 are [PAD], [EOS], [UNK]. EOS must not be id 2: CLIP treats
    # eos_token_id == 2 as the legacy "EOS is the largest id" and would pool the wrong token.
    vocab = {w: i for i, w in enumerate(["[PAD]", "[EOS]", "[UNK]", *vocabulary()])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A [EOS]", special_tokens=[("[EOS]", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]",
                                        unk_token="[UNK]", model_max_length=MAX_LENGTH)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=args.text_dim, intermediate_size=2 * args.text_dim, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=MAX_LENGTH, pad_token_id=0, bos_token_id=1, eos_token_id=1))
    # Pixel space, no VAE: 32x32x3 is 3072 numbers, fewer than FLUX's 64x64x16 latents of a 512px image, and an
    # exact "decoder" (sampler.toy_latents_to_images) lets the verifier score what the transformer drew.
    heads = args.dim // 32
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=48, out_channels=48, num_layers=args.num_layers,
        num_single_layers=args.num_single_layers, attention_head_dim=32, num_attention_heads=heads,
        joint_attention_dim=args.text_dim, pooled_projection_dim=args.text_dim, guidance_embeds=False,
        axes_dims_rope=(8, 12, 12))  # RoPE over (text/image, row, col) ids; sums to the head dim
    return transformer, text_encoder, tokenizer


def edge_weights(images, boost):
    """Per-element loss weights (N, 64, 48): 1 + boost where a pixel's 3x3 neighbourhood changes colour. The shape
    word only decides the ~16% of pixels along an object's edge; unweighted, the model learns colour and place and
    draws shapeless blobs (held-out reward 0.26 vs 0.31 with boost 4 at 1500 steps)."""
    import sampler
    spread = (F.max_pool2d(images, 3, 1, 1) + F.max_pool2d(-images, 3, 1, 1)).amax(1, keepdim=True)  # (N, 1, 32, 32)
    w = 1 + boost * (spread > 0.05).float()
    return sampler.toy_images_to_latents((w.expand(-1, 3, -1, -1) + 1) / 2)  # packed like the pixels (x -> 2x - 1)


def pretrain(args: Args, progress=True):
    """Flow matching from scratch, text encoder and transformer jointly; returns the sampler's FlowModel."""
    import sampler
    from tqdm import tqdm
    torch.manual_seed(args.seed)
    transformer, text_encoder, tokenizer = build_model(args)
    model = sampler.toy_model(transformer, text_encoder, tokenizer, MAX_LENGTH)
    params = [*transformer.parameters(), *text_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    warmup = min(100, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min((i + 1) / warmup, 0.55 + 0.45 * np.cos(
        np.pi * i / args.steps)))
    gen = torch.Generator().manual_seed(args.seed)
    ema = [q.detach().clone() for q in params]  # an exponential moving average of the weights is what ships
    bar = tqdm(range(args.steps), desc="pretrain", disable=not progress)
    for step in bar:
        prompts = sample_prompts("train", args.batch_size, seed=args.seed * 1_000_003 + step)
        images = render(prompts, seed=args.seed * 1_000_003 + step)  # (B, 3, 32, 32)
        x0 = sampler.toy_images_to_latents(images)  # (B, 64, 48)
        eps = torch.randn(x0.shape, generator=gen)  # (B, 64, 48)
        # s ~ U(0, 1) covers every sigma of the shift-3 schedule. Not the shifted logit-normal: it would rarely
        # train s < 0.4, where the last steps draw the edges the verifier judges. x_s = (1-s) x0 + s eps, v = eps - x0.
        s = torch.rand(args.batch_size, generator=gen)  # (B,)
        xs = (1 - s[:, None, None]) * x0 + s[:, None, None] * eps  # (B, 64, 48)
        v = model.velocity(transformer, xs, s, model.encode_prompts(prompts))  # (B, 64, 48)
        w = edge_weights(images, args.edge_weight)  # (B, 64, 48)
        loss = ((v - (eps - x0)).square() * w).mean() / w.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        torch._foreach_lerp_(ema, [q.detach() for q in params], 1 - min(args.ema, step / (step + 10)))
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    torch._foreach_copy_([q.data for q in params], ema)
    return model, text_encoder, tokenizer


def evaluate(model, prompts, *, mode, seed=0, num_steps=17, shift=3.0, eta=0.7):
    """Sample one image per prompt with the training schedule; returns (images, verdict, {category: (score, strict)})."""
    import sampler
    traj = sampler.rollout(model, prompts, num_generations=1, num_steps=num_steps, shift=shift, mode=mode, eta=eta,
                           seed=seed, batch_size=128)
    verdict, cats = verify(traj.images, prompts), [category(p) for p in prompts]
    table = {c: (verdict.score[idx].mean().item(), verdict.strict[idx].float().mean().item())
             for c in CATEGORIES if (idx := torch.tensor([k == c for k in cats])).any()}
    table["all"] = (verdict.score.mean().item(), verdict.strict.float().mean().item())
    return traj.images, verdict, table


def main(args: Args):
    import sampler
    from runtime import image_grid
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if not args.eval_only:
        t0 = time.time()
        model, text_encoder, tokenizer = pretrain(args)
        minutes = (time.time() - t0) / 60
        out.mkdir(parents=True, exist_ok=True)
        model.transformer.save_pretrained(out / "transformer")  # safetensors, the libraries' own formats
        text_encoder.save_pretrained(out / "text_encoder")
        tokenizer.save_pretrained(out / "tokenizer")
        (out / "toy_config.json").write_text(json.dumps({"image_size": 32, "max_length": MAX_LENGTH}) + "\n")
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
        print(f"pretrained in {minutes:.1f} min; bundle {out} is {size:.2f} MB")
    model = sampler.load_model(str(out))  # evaluate what was saved, through the loading code trainers use
    model.transformer.eval()
    prompts = sample_prompts("heldout", args.eval_prompts, seed=args.seed + 1)
    for mode in ("ode", "flow"):
        images, _, table = evaluate(model, prompts, mode=mode, seed=args.seed)
        print(f"held-out, {mode:4s} 17 steps shift 3: " + "  ".join(f"{c} {s:.3f}/{a:.2f}" for c, (s, a) in table.items())
              + "   (mean reward / strict accuracy)")
    # The grid: two held-out prompts per category, four samples each (flow SDE, the policy RL starts from).
    grid_prompts = [p for c in CATEGORIES for p in [q for q in prompts if category(q) == c][:2]]
    images = sampler.rollout(model, grid_prompts, num_generations=4, seed=args.seed).images  # (8*5, 3, 32, 32)
    image_grid(images, [p for p in grid_prompts for _ in range(4)], cols=4, scale=3).save(out / "samples.png")


if __name__ == "__main__":
    import tyro
    main(tyro.cli(Args))
