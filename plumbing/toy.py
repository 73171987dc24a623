"""
The CPU-scale world: a grammar of coloured shapes, an exact renderer and an exact verifier. It imports no
project file; scripts/pretrain_toy.py pretrains on it the tiny FLUX-class model that ships in assets/toy/.

Scenes are coloured shapes on black, 32x32 pixels; prompts are plain English in five GenEval-like categories:
    single_object  "a red circle"                      counting   "three yellow triangles"
    position       "a blue square on the left"         two_object "a red circle and a blue square"
    relation       "a green square above two purple circles"
`render()` draws a prompt exactly: objects 10 pixels wide in 12x12 cells on a 4-pixel grid, placed by (seed,
index). `verify()` scores an image against its prompt exactly, with GenEval-style atoms: every object group is
present (colour, and a shape that fits its template), has the exact count, sits in its region, and holds its
relation to the other group. The score is the fraction of atoms right (partial credit, the toy reward);
`strict` is all of them right (GenEval accuracy). Compositions (scenes up to surface form: "A left of B" is
"B right of A") are split train / held-out by a hash: held-out prompts combine seen words anew.
"""

import random
import re
import zlib
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------- the grammar
COLOURS = {  # RGB in [0, 1], every pair >= 0.54 apart
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.7, 0.1),
    "blue": (0.1, 0.25, 0.95),
    "yellow": (0.95, 0.85, 0.1),
    "purple": (0.6, 0.1, 0.8),
    "cyan": (0.1, 0.8, 0.85),
}
SHAPES = ("circle", "square", "triangle")
NUMBERS = {1: "a", 2: "two", 3: "three", 4: "four"}
POSITIONS = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}
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
_GLUE = "|".join(["and", *RELATIONS, *POSITIONS.values()])
_PROMPT = re.compile(rf"^{_OBJ}(?: ({_GLUE}))?(?: {_OBJ})?$")  # groups 1-3: object, 4: glue, 5-7: object
_COUNT = {w: n for n, w in NUMBERS.items()}
_POSITION = {p: k for k, p in POSITIONS.items()}


def parse(prompt: str) -> Scene:
    """The inverse of prompt_of; raises ValueError on a sentence outside the grammar."""
    m = _PROMPT.match(prompt.strip().lower())
    glue, second = (m[4], m[5]) if m else (None, None)
    if m is None or (second is not None) != (glue in ("and", *RELATIONS)):
        raise ValueError(f"not a toy-grammar prompt: {prompt!r}")
    groups = tuple((_COUNT[m[i]], m[i + 1], m[i + 2]) for i in (1, 5) if m[i])  # (count, colour, shape) each
    if glue in _POSITION:
        return Scene("position", groups, _POSITION[glue])
    if glue is not None:
        return Scene("two_object", groups) if glue == "and" else Scene("relation", groups, glue)
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

    def group(count):
        return (count, rng.choice(list(COLOURS)), rng.choice(SHAPES))

    if cat in ("single_object", "counting", "position"):
        groups = (group(rng.randint(2, 4) if cat == "counting" else 1),)
        return Scene(cat, groups, rng.choice(list(POSITIONS)) if cat == "position" else None)
    while True:
        if cat == "two_object":
            a, b = group(1), group(1)
        else:  # relation groups count one or two each: "a green square above two purple circles"
            a, b = group(rng.randint(1, 2)), group(rng.randint(1, 2))
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


def vocabulary() -> list[str]:
    """Every word the grammar says, sorted (scripts/pretrain_toy.py's tokenizer is word level over them)."""
    words = {"and", *NUMBERS.values(), *COLOURS, *SHAPES, *(s + "s" for s in SHAPES)}
    return sorted(words.union(*(p.split() for p in (*POSITIONS.values(), *RELATIONS))))


# ----------------------------------------------------------------------------- the renderer
# Bounding-box centres (pixels, 0..32) decide positions, for the renderer and the verifier alike (GenEval uses
# box centres too). A relation needs a 4-pixel margin so that "left of" is never a judgement call.
REGIONS = {  # POSITIONS key: the box of centres (x from, x to, y from, y to) it accepts, inclusive
    "left": (0, 12, 0, 32),
    "right": (20, 32, 0, 32),
    "top": (0, 32, 0, 12),
    "bottom": (0, 32, 20, 32),
    "centre": (12, 20, 12, 20),
}


def in_region(cx, cy, pos):
    """Whether a box centre (cx, cy) lies in the region of a POSITIONS key."""
    x0, x1, y0, y1 = REGIONS[pos]
    return x0 <= cx <= x1 and y0 <= cy <= y1


AXIS = {"to the left of": (0, -1), "to the right of": (0, 1), "above": (1, -1), "below": (1, 1)}  # axis, sign


def related(a, b, rel):
    """Whether box centre a = (cx, cy) stands in relation `rel` (a RELATIONS phrase) to box centre b."""
    axis, sign = AXIS[rel]
    return sign * (a[axis] - b[axis]) >= 4


def _template(shape, n):
    """An n x n mask, cropped to its pixels (a triangle of even n loses an empty row)."""
    u = np.arange(n) + 0.5 - n / 2
    y, x = np.meshgrid(u, u, indexing="ij")  # (n, n) each, pixel centres about the box centre
    if shape == "square":
        m = np.ones((n, n), bool)
    elif shape == "circle":
        m = x**2 + y**2 <= (n / 2 - 0.1) ** 2
    else:  # the triangle stands on its base, apex up
        m = np.abs(x) <= (y + n / 2) / 2 + 0.01
    rows, cols = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
    return m[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


# One size on the toy model's 4x4-pixel token grid, always 3x3 tokens: sizes 9-12 at any pixel gave blobs
SIZES, CELL = (10,), 12  # box sides in pixels; each object centred in a CELL x CELL cell
TEMPLATES = {(s, n): _template(s, n) for s in SHAPES for n in SIZES}


def _layout(scene: Scene, rng: random.Random):
    """Place every object by rejection sampling, as [(colour, mask, y0, x0)]: in a 12x12 cell at a multiple of
    4 pixels, a gap between boxes (objects never merge into one component), its region or relation held."""

    def fits(y0, x0, h, w, gi, boxes):
        for by, bx, bh, bw, _ in boxes:
            if y0 < by + bh + 1 and by < y0 + h + 1 and x0 < bx + bw + 1 and bx < x0 + w + 1:
                return False  # overlaps, or touches, a box already placed
        c = (x0 + w / 2, y0 + h / 2)
        if scene.category == "position":
            return in_region(*c, scene.where)
        if scene.category == "relation" and gi == 1:
            firsts = [(bx + bw / 2, by + bh / 2) for by, bx, bh, bw, g in boxes if g == 0]
            return all(related(a, c, scene.where) for a in firsts)
        return True

    for _ in range(100):
        placed, boxes = [], []  # boxes: (y0, x0, h, w, group)
        for gi, (count, colour, shape) in enumerate(scene.groups):
            for _ in range(count):
                mask = TEMPLATES[shape, rng.choice(SIZES)]
                h, w = mask.shape
                for _ in range(200):
                    y0, x0 = (4 * rng.randint(0, (32 - CELL) // 4) + (CELL - n) // 2 for n in (h, w))
                    if fits(y0, x0, h, w, gi, boxes):
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
            h, w = mask.shape
            canvas[i, y0 : y0 + h, x0 : x0 + w][mask] = COLOURS[colour]
    return torch.from_numpy(canvas).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32)


# ----------------------------------------------------------------------------- the verifier
COLOUR_TOL = 0.25  # a pixel takes the nearest palette colour within this RGB distance, else it is background
MIN_AREA = 6  # smaller components are specks, not objects (the smallest rendered object has 25 pixels)
WINDOW = 20  # side of the window, centred on a component's box, in which its shape is matched
MIN_IOU = 0.7  # a component is an object of a shape only if a template fits it this well (rendered: 1.0)


def _shape_bank():
    """Every shape template, sides 7-14 (the rendered 9-12, give or take), moved by up to a pixel either way,
    in a WINDOW x WINDOW frame: (T, WINDOW**2) masks and the (T,) SHAPES index of each."""
    masks, shapes = [], []
    for k, shape in enumerate(SHAPES):
        for n in range(7, 15):
            m = torch.from_numpy(_template(shape, n))  # (h, w) bool
            h, w = m.shape
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    y0, x0 = WINDOW // 2 - h // 2 + dy, WINDOW // 2 - w // 2 + dx
                    frame = torch.zeros(WINDOW, WINDOW)  # (WINDOW, WINDOW)
                    frame[y0 : y0 + h, x0 : x0 + w] = m.float()
                    masks.append(frame.flatten())
                    shapes.append(k)
    return torch.stack(masks), torch.tensor(shapes)  # (T, WINDOW**2), (T,)


SHAPE_BANK, SHAPE_OF = _shape_bank()


def _grow(label):
    """The max of each pixel's label and its 4 neighbours' (N, 1, H, W)."""
    p = F.pad(label, (1, 1, 1, 1))  # (N, 1, H+2, W+2)
    neighbours = [label, p[..., :-2, 1:-1], p[..., 2:, 1:-1], p[..., 1:-1, :-2], p[..., 1:-1, 2:]]
    return torch.stack(neighbours).amax(0)  # (N, 1, H, W)


def detect(images: torch.Tensor) -> list[list[tuple]]:
    """Components in each image as (colour, shape, cx, cy, iou): segment by colour, 4-connected components of
    at least MIN_AREA pixels, the template that overlaps each best and its IoU. A component that fits no
    template with IoU >= MIN_IOU has shape None: a blob or a fragment, not an object of any shape."""
    n, _, h, w = images.shape
    K = len(COLOURS)  # the palette's size
    palette = torch.tensor(list(COLOURS.values()))  # (K, 3)
    dist = (images.float()[:, None] - palette[None, :, :, None, None]).square().sum(2)  # (N, K, H, W)
    dmin, colour = dist.min(1)  # (N, H, W) each: distance to and index of the nearest palette colour
    nearest = F.one_hot(colour, K).permute(0, 3, 1, 2) > 0  # (N, K, H, W)
    masks = nearest & (dmin < COLOUR_TOL**2)[:, None]  # (N, K, H, W)
    planes = masks.flatten(0, 1)  # (N*K, H, W): plane i is colour i % K of image i // K
    used = planes.flatten(1).any(1).nonzero()[:, 0]  # (U,) planes with any pixel of their colour
    # Connected components, vectorised: every pixel starts with its own label and takes the max of its
    # 4-neighbourhood inside its mask until nothing changes; each component ends up labelled by its largest
    # pixel id. Not 8-connected: a sample's stray pixel touching an object only at a corner would join it.
    mask = planes[used, None].float()  # (U, 1, H, W)
    label = torch.arange(1, h * w + 1, dtype=torch.float32).view(1, 1, h, w) * mask  # (U, 1, H, W)
    while not torch.equal(new := _grow(label) * mask, label):
        label = new
    plane, _, ys, xs = mask.nonzero(as_tuple=True)  # (P,) each: every foreground pixel
    key = used[plane] * (h * w + 1) + label[plane, 0, ys, xs].long()  # (P,) one value per component
    uniq, inv = torch.unique(key, return_inverse=True)  # (M,), (P,)
    area = torch.bincount(inv, minlength=len(uniq))  # (M,)
    y0 = torch.full((len(uniq),), h).scatter_reduce(0, inv, ys, "amin")  # (M,) box rows and columns
    y1 = torch.full((len(uniq),), -1).scatter_reduce(0, inv, ys, "amax")
    x0 = torch.full((len(uniq),), w).scatter_reduce(0, inv, xs, "amin")
    x1 = torch.full((len(uniq),), -1).scatter_reduce(0, inv, xs, "amax")
    # Shape: the template of best intersection-over-union, a rendered object matching its own exactly. A rule
    # on the fill ratio (area / box) read a visibly right square with a few ragged edge pixels as a circle.
    mid_y, mid_x = (y0 + y1 + 1) // 2, (x0 + x1 + 1) // 2  # (M,) box centres, the windows' centres
    wy = ys - mid_y[inv] + WINDOW // 2  # (P,) each pixel's row in its component's window
    wx = xs - mid_x[inv] + WINDOW // 2  # (P,) and column
    inside = (wy >= 0) & (wy < WINDOW) & (wx >= 0) & (wx < WINDOW)  # (P,)
    window = torch.zeros(len(uniq), WINDOW * WINDOW)  # (M, WINDOW**2)
    window[inv[inside], (wy * WINDOW + wx)[inside]] = 1.0
    overlap = window @ SHAPE_BANK.T  # (M, T)
    iou = overlap / (area[:, None] + SHAPE_BANK.sum(1) - overlap)  # (M, T), area incl. pixels off the window
    fit, best = iou.max(1)  # (M,) each: the best template's IoU and index
    cx, cy = (x0 + x1 + 1) / 2, (y0 + y1 + 1) / 2  # (M,) box centres in pixels
    plane_of = uniq // (h * w + 1)  # (M,) the plane: image plane_of // K, colour plane_of % K
    objects, names = [[] for _ in range(n)], list(COLOURS)
    for u, a, s, q, x, y in zip(
        *(c.tolist() for c in (plane_of, area, SHAPE_OF[best], fit, cx, cy)), strict=True
    ):
        if a >= MIN_AREA:
            objects[u // K].append((names[u % K], SHAPES[s] if q >= MIN_IOU else None, x, y, q))
    return objects


def atoms(scene: Scene, objects: list[tuple]) -> dict[str, bool]:
    """GenEval-style checks of one image's objects against its scene, by name."""
    found = [[(cx, cy) for c, s, cx, cy, _ in objects if (c, s) == group[1:]] for group in scene.groups]
    out = {}
    for (count, colour, shape), boxes in zip(scene.groups, found, strict=True):
        out[f"object: {colour} {shape}"] = len(boxes) > 0
        out[f"count: {count} {colour} {shape}"] = len(boxes) == count
        if scene.category == "position":
            in_place = all(in_region(*b, scene.where) for b in boxes)
            out[f"position: {colour} {shape} {scene.where}"] = len(boxes) > 0 and in_place
    if scene.category == "relation":
        (_, c0, s0), (_, c1, s1) = scene.groups
        holds = all(related(a, b, scene.where) for a in found[0] for b in found[1])
        out[f"relation: {c0} {s0} {scene.where} {c1} {s1}"] = bool(found[0] and found[1]) and holds
    return out


@dataclass
class Verdict:
    score: torch.Tensor  # (N,) float, fraction of atoms right: the toy reward
    strict: torch.Tensor  # (N,) bool, every atom right (GenEval accuracy)
    atoms: list  # N dicts atom name -> bool


def verify(images: torch.Tensor, prompts: list[str]) -> Verdict:
    """Score images (N, 3, 32, 32) in [0, 1] against their prompts exactly."""
    per_image = [atoms(parse(p), objs) for p, objs in zip(prompts, detect(images), strict=True)]
    score = torch.tensor([sum(a.values()) / len(a) for a in per_image])  # (N,)
    strict = torch.tensor([all(a.values()) for a in per_image])  # (N,)
    return Verdict(score, strict, per_image)
