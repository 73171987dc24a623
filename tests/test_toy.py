"""plumbing/toy.py, the world: the grammar's split, the renderer against the verifier, hand-checked atoms."""

import itertools
import time

import pytest
import torch

import eval
from plumbing import toy
from plumbing.toy import COLOURS, SHAPES, Scene


def all_scenes():
    """Every scene the grammar can say, by category (relation groups count one or two, as random_scene
    draws them)."""
    objs = [(c, s) for c in COLOURS for s in SHAPES]
    yield from (Scene("single_object", ((1, c, s),)) for c, s in objs)
    yield from (Scene("counting", ((n, c, s),)) for n in (2, 3, 4) for c, s in objs)
    yield from (Scene("position", ((1, c, s),), p) for c, s in objs for p in toy.POSITIONS)
    for a, b in itertools.permutations(objs, 2):
        yield Scene("two_object", ((1, *a), (1, *b)))
        for n, m, rel in itertools.product((1, 2), (1, 2), toy.RELATIONS):
            yield Scene("relation", ((n, *a), (m, *b)), rel)


def test_heldout_compositions_never_in_train():
    scenes = list(all_scenes())
    heldout = {toy.composition(s) for s in scenes if toy.split_of(s) == "heldout"}
    train = {toy.composition(s) for s in scenes if toy.split_of(s) == "train"}
    assert not heldout & train  # a composition has one split, whatever its surface form
    for cat in toy.CATEGORIES:  # every category has held-out compositions to evaluate on
        assert any(k[0] == cat for k in heldout) and any(k[0] == cat for k in train), cat
    # "A left of B" and "B right of A" are one composition, so one of them cannot leak the other into training
    a = Scene("relation", ((1, "red", "circle"), (2, "blue", "square")), "to the left of")
    b = Scene("relation", ((2, "blue", "square"), (1, "red", "circle")), "to the right of")
    assert toy.composition(a) == toy.composition(b)
    for split, other in (("train", heldout), ("heldout", train)):
        prompts = toy.sample_prompts(split, 3000, seed=1)
        assert not {toy.composition(toy.parse(p)) for p in prompts} & other
        assert {toy.category(p) for p in prompts} == set(toy.CATEGORIES)
    assert toy.sample_prompts("train", 50, seed=3) == toy.sample_prompts("train", 50, seed=3)


def test_prompts_round_trip():
    for p in toy.sample_prompts("train", 300, seed=0) + toy.sample_prompts("heldout", 300, seed=0):
        assert toy.prompt_of(toy.parse(p)) == p
    assert toy.category("three yellow triangles") == "counting"
    assert toy.category("a green square above two purple circles") == "relation"
    assert toy.category("a red circle on the left") == "position"
    for bad in ("a red circle a blue square", "five red circles", "a red circle and", "a red dog"):
        with pytest.raises(ValueError):
            toy.parse(bad)
    # the vocabulary (scripts/pretrain_toy.py's tokenizer) is exactly the words the grammar says
    assert set(toy.vocabulary()) == {w for s in all_scenes() for w in toy.prompt_of(s).split()}


def test_rendered_ground_truth_scores_one():
    prompts = toy.sample_prompts("train", 250, seed=0) + toy.sample_prompts("heldout", 250, seed=0)
    images = toy.render(prompts, seed=0)  # (500, 3, 32, 32)
    assert images.shape == (500, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    verdict = toy.verify(images, prompts)
    assert verdict.strict.float().mean() >= 0.99
    assert verdict.score.shape == (500,) and verdict.strict.dtype == torch.bool
    # the same scenes judged against other prompts score lower on average
    assert toy.verify(images, prompts[1:] + prompts[:1]).score.mean() < verdict.score.mean() - 0.5
    assert toy.verify(torch.zeros(8, 3, 32, 32), prompts[:8]).score.eq(0).all()  # blank (background) image
    # jitter: one prompt, many images; the same seed, the same images
    same = toy.render(["two blue squares"] * 16, seed=0)
    assert len({img.numpy().tobytes() for img in same}) > 12
    assert torch.equal(same, toy.render(["two blue squares"] * 16, seed=0))


def draw(objects):
    """A hand-built scene: objects (colour, shape, size, x0, y0) pasted at exact pixels."""
    image = torch.zeros(3, 32, 32)
    for colour, shape, size, x0, y0 in objects:
        mask = torch.from_numpy(toy._template(shape, size))  # any size the verifier knows, 7 to 14
        h, w = mask.shape
        image[:, y0 : y0 + h, x0 : x0 + w][:, mask] = torch.tensor(COLOURS[colour])[:, None]
    return image


def test_atoms_on_hand_built_scenes():
    left, right = ("red", "circle", 10, 2, 11), ("blue", "square", 10, 20, 11)  # box centres x=7 and x=25
    cases = [  # (prompt, objects, atoms stated by hand)
        (
            "a red circle to the left of a blue square",
            [left, right],
            {
                "object: red circle": True,
                "count: 1 red circle": True,
                "object: blue square": True,
                "count: 1 blue square": True,
                "relation: red circle to the left of blue square": True,
            },
        ),
        (
            "a red circle to the right of a blue square",
            [left, right],
            {
                "object: red circle": True,
                "count: 1 red circle": True,
                "object: blue square": True,
                "count: 1 blue square": True,
                "relation: red circle to the right of blue square": False,
            },
        ),
        (
            "three yellow triangles",
            [("yellow", "triangle", 9, 2, 2), ("yellow", "triangle", 11, 18, 18)],
            {"object: yellow triangle": True, "count: 3 yellow triangle": False},
        ),
        (
            "a green square above two purple circles",  # one "circle" is a square: one purple circle, below
            [
                ("green", "square", 9, 12, 1),
                ("purple", "circle", 11, 2, 19),
                ("purple", "square", 11, 19, 19),
            ],
            {
                "object: green square": True,
                "count: 1 green square": True,
                "object: purple circle": True,
                "count: 2 purple circle": False,
                "relation: green square above purple circle": True,
            },
        ),
        (
            "a blue square on the left",
            [right],
            {"object: blue square": True, "count: 1 blue square": True, "position: blue square left": False},
        ),
        (
            "a cyan triangle in the centre",
            [("cyan", "triangle", 9, 12, 11)],  # box centre (16.5, 15.5)
            {
                "object: cyan triangle": True,
                "count: 1 cyan triangle": True,
                "position: cyan triangle centre": True,
            },
        ),
        (
            "a red circle and a blue square",
            [("red", "square", 10, 2, 11), right],  # wrong shape for the red one
            {
                "object: red circle": False,
                "count: 1 red circle": False,
                "object: blue square": True,
                "count: 1 blue square": True,
            },
        ),
    ]
    prompts = [p for p, _, _ in cases]
    verdict = toy.verify(torch.stack([draw(objs) for _, objs, _ in cases]), prompts)
    for (prompt, _, expected), got in zip(cases, verdict.atoms, strict=True):
        assert got == expected, prompt
    assert verdict.strict.tolist() == [True, False, False, False, False, True, False]
    assert verdict.score[2] == 0.5 and abs(verdict.score[3] - 0.8) < 1e-6
    # tolerance: colour noise within COLOUR_TOL keeps the verdict; a 2x2 speck is no object
    noisy = draw([left, right]) + 0.05 * torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(0))
    noisy[:, 0:2, 30:32] = torch.tensor(COLOURS["red"])[:, None, None]
    assert toy.verify(noisy.clamp(0, 1)[None], prompts[:1]).strict.item()


def test_ragged_shapes_keep_their_shape():
    """A sample's shape is visibly right with a few wrong pixels at its edge; the verifier must read it so.
    (The old fill-ratio rule read this square as a circle.)"""
    red, blue = torch.tensor(COLOURS["red"])[:, None], torch.tensor(COLOURS["blue"])
    image = draw([("red", "square", 11, 3, 3), ("blue", "circle", 11, 18, 18)])
    image[:, 3, 5:8] = 0  # a notch in the square's top edge
    image[:, 8, 8] = 0  # a pinhole
    image[:, 14, 7] = red[:, 0]  # a one-pixel bump below its bottom edge
    image[:, 15, 15] = red[:, 0]  # a stray pixel touching only the square's corner
    image[:, 17, 23:25] = blue[:, None]  # a 2-pixel spur on the circle's top
    image[:, 24, 18] = 0  # a bite out of its left side
    objects = sorted(toy.detect(image[None])[0])
    assert [(c, s) for c, s, *_ in objects] == [("blue", "circle"), ("red", "square")]


def test_verify_is_fast():
    prompts = toy.sample_prompts("train", 256, seed=2)
    images = toy.render(prompts, seed=2)
    toy.verify(images, prompts)  # warm up
    best = min(_timed(lambda: toy.verify(images, prompts)) for _ in range(3))
    assert best < 1.0, f"verify took {best:.2f}s for 256 images"


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def test_blobs_and_fragments_are_no_shape():
    """A component counts as an object only if a template fits it with IoU >= MIN_IOU; rendered scenes fit
    exactly. A bar (a fragment) or a ring (a ragged blob) of the prompt's colour is no red circle."""
    prompts = toy.sample_prompts("heldout", 200, seed=5)
    assert {q for objs in toy.detect(toy.render(prompts, seed=5)) for *_, q in objs} == {1.0}
    bar = torch.ones(4, 10, dtype=torch.bool)
    ring = torch.from_numpy(toy._template("circle", 12)).clone()
    ring[3:9, 3:9] = False
    for blob in (bar, ring):
        image = torch.zeros(3, 32, 32)
        image[:, 5 : 5 + blob.shape[0], 5 : 5 + blob.shape[1]][:, blob] = torch.tensor(COLOURS["red"])[
            :, None
        ]
        (found,) = toy.detect(image[None])
        assert [(c, s) for c, s, *_ in found] == [("red", None)] and found[0][4] < toy.MIN_IOU
        assert toy.verify(image[None], ["a red circle"]).score.item() == 0


def test_drawing_quality_reads_fragments_and_faint_texture():
    prompts = toy.sample_prompts("heldout", 100, seed=6)
    rendered = toy.render(prompts, seed=6)
    clean = eval.drawing_quality(rendered, prompts)
    assert (clean["fit"] == 1).all() and (clean["faint"] == 0).all()  # ground truth draws cleanly
    image = torch.zeros(2, 3, 32, 32)
    image[:, :, 5:9, 5:15] = torch.tensor(COLOURS["red"])[:, None, None]  # a red bar: a fragment, no shape
    image[1, :, 20:, :] = 0.2  # and a faint grey band over a quarter of the second image
    image[1, :, 24:26, 2:4] = torch.tensor(COLOURS["blue"])[:, None, None]  # a blue speck: not the prompt's
    quality = eval.drawing_quality(image, ["a red circle", "a red circle"])
    assert quality["fit"].tolist() == [0.0, 0.0]
    assert quality["faint"].tolist() == [0.0, pytest.approx((12 * 32 - 4) / 1024)]
    circle = toy.render(["a red circle"], seed=0)
    circle[:, :, 28:, 20:30] = torch.tensor(COLOURS["red"])[:, None, None]  # the circle and a red fragment
    assert eval.drawing_quality(circle, ["a red circle"])["fit"].tolist() == [0.5]
