"""plumbing/reward_inputs.py: the torch preprocessing against PIL and the PIL processors (CLIP, Qwen2-VL),
HPSv2's rounding, and open_clip's tokenisation against a transcription of its rules, on the tiny CLIP
vocabulary of test_reward_loading.py. Nothing is downloaded."""

import html
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from plumbing import reward_inputs
from test_reward_loading import MEAN, PROMPTS, STD, clip_merges, clip_tokenizer, images


# ----------------------------------------------------------------------------- preprocessing vs the PIL path
def to_pil(x):
    return Image.fromarray((x * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())


def test_resize_follows_pils_order_of_passes():
    # 150 random shapes, 16..300 px to 8..240 px, noise (the worst case for bicubic's overshoot). Measured:
    # at most 1.10/255 from PIL; the fixed width-first order was up to 24.5/255 off on shapes Pillow 13
    # resizes height first, and 5.2/255 on smooth images with edges.
    gen, height_first, worst = torch.Generator().manual_seed(0), 0, 0.0
    for _ in range(150):
        ih, iw = torch.randint(16, 301, (2,), generator=gen).tolist()
        h, w = torch.randint(8, 241, (2,), generator=gen).tolist()
        x = torch.randint(0, 256, (1, 3, ih, iw), generator=gen).float() / 255
        want = torch.from_numpy(np.array(to_pil(x[0]).resize((w, h), Image.BICUBIC))).permute(2, 0, 1)
        worst = max(worst, (reward_inputs._resize(x, h, w)[0] * 255 - want).abs().max().item())
        height_first += ih - h > max(0, 2 * (iw - w))
    assert worst < 1.15 and height_first > 30  # PIL rounds to uint8 after each pass: ~1/255 is the floor


@pytest.mark.parametrize("h,w", [(64, 48), (50, 70), (37, 37), (300, 200), (300, 60)])
def test_preprocess_matches_pil_processors(h, w):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    x = (images(2, h, w, seed=h) * 255).round() / 255  # exactly representable in uint8, as decoded images are
    ref = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    want = torch.from_numpy(np.stack(ref([to_pil(i) for i in x])["pixel_values"]))
    got = reward_inputs.preprocess(x, 28)
    assert got.shape == want.shape == (2, 3, 28, 28)
    gap = ((got - want) * STD).abs()  # in [0, 1] pixel units: PIL rounds to uint8 between and after passes
    assert gap.max() < 1.15 / 255 and gap.mean() < 0.4 / 255
    # HPSv2's ResizeMaxSize on a tensor (torchvision = one antialiased interpolate): long side -> 28, short
    # side round(side * (28 / long)), centred on black, then normalised
    s = 28 / max(h, w)
    oh, ow = round(h * s), round(w * s)
    small = F.interpolate(x, size=(oh, ow), mode="bicubic", antialias=True) if (oh, ow) != (h, w) else x
    canvas = torch.zeros(2, 3, 28, 28)
    canvas[..., (28 - oh) // 2 : (28 - oh) // 2 + oh, (28 - ow) // 2 : (28 - ow) // 2 + ow] = small
    torch.testing.assert_close(reward_inputs.preprocess(x, 28, mode="longest"), (canvas - MEAN) / STD)
    # Qwen2-VL (HPSv3): PIL bicubic to smart_resize, then the processor normalises and cuts patches
    qh, qw = reward_inputs.smart_resize(h, w, 28, 64 * 28 * 28, 64 * 28 * 28)
    proc = Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280})
    ref = proc([to_pil(i).resize((qw, qh), Image.BICUBIC) for i in x], return_tensors="pt")
    pixels, grid = reward_inputs.qwen2vl_pixels(x, min_pixels=64 * 28 * 28, max_pixels=64 * 28 * 28)
    assert torch.equal(grid, ref["image_grid_thw"])
    assert (pixels - ref["pixel_values"]).abs().max() * max(reward_inputs.OPENAI_STD) < 1.15 / 255


def test_longest_rounds_as_hpsv2():
    # HPSv2's ResizeMaxSize: round(105 * (224 / 192)) = 123 rows (fp rounding: 122.50000000000001);
    # round(105 * 224 / 192) would give 122. One of 28 such size pairs up to 2048 px at 224.
    x = torch.ones(1, 3, 105, 192)
    rows = (reward_inputs.preprocess(x, 224, mode="longest", mean=(0.0,) * 3, std=(1.0,) * 3) != 0).any(-1)
    assert rows[0, 0].sum() == 123


def test_smart_resize_is_qwen2vls():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    pixels = reward_inputs.HPSV3_PIXELS
    for h, w in [(1024, 1024), (512, 512), (720, 1280), (40, 52), (1000, 333), (28, 28)]:
        assert reward_inputs.smart_resize(h, w) == smart_resize(h, w, 28, pixels, pixels)
    assert reward_inputs.smart_resize(1024, 1024) == (448, 448)  # 32 x 32 patches, 256 tokens after merging


def test_preprocess_is_exact_without_resampling():
    x = images(2, 28, 28)
    want = (x - MEAN) / STD
    for mode in ("shortest", "longest", "squash"):
        assert torch.equal(reward_inputs.preprocess(x, 28, mode=mode), want)


# ----------------------------------------------------------------------------- open_clip's tokenisation
def open_clip_reference(texts, vocab, merges, context_length):
    """open_clip's SimpleTokenizer (mlfoundations/open_clip, src/open_clip/tokenizer.py) transcribed, less
    ftfy: clean ("lower"), split by its pattern, BPE by merge rank, <start> ids <end>, cut to the context
    with <end> last, padded with zeros."""
    import regex

    pattern = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    ranks = {m: i for i, m in enumerate(merges)}
    out = torch.zeros(len(texts), context_length, dtype=torch.long)
    for row, text in enumerate(texts):
        text = " ".join(html.unescape(html.unescape(text)).strip().split()).strip().lower()
        ids = [vocab["<|startoftext|>"]]
        for word in regex.findall(pattern, text, regex.IGNORECASE):
            parts = [*word[:-1], word[-1] + "</w>"]
            while len(parts) > 1:
                best = min(zip(parts, parts[1:], strict=False), key=lambda p: ranks.get(p, math.inf))
                if best not in ranks:
                    break
                merged, i = [], 0
                while i < len(parts):
                    pair = tuple(parts[i : i + 2]) == best
                    merged.append(parts[i] + parts[i + 1] if pair else parts[i])
                    i += 2 if pair else 1
                parts = merged
            ids += [vocab[p] for p in parts]
        ids = [*ids[: context_length - 1], vocab["<|endoftext|>"]]
        out[row, : len(ids)] = torch.tensor(ids)
    return out


def test_open_clip_tokens_match_open_clips_rules(tmp_path):
    tok = clip_tokenizer(tmp_path)
    texts = PROMPTS + ["A Red CIRCLE &amp; a DOG!", "rock &amp;amp; roll!!", "dog!", "! !! !!!", "", "cat's"]
    texts += ["  two   red\tcircles \n", "&quot;red&quot; (a, b); c: d? <|endoftext|> it&#39;s", "dog " * 20]
    want = open_clip_reference(texts, tok.get_vocab(), clip_merges(), 16)
    ids, mask = reward_inputs.open_clip_tokens(tok, 16, texts)
    assert mask is None and torch.equal(ids, want)
    tok.pad_token = "<|endoftext|>"  # openai's pad token: open_clip's padding is zeros all the same
    assert torch.equal(reward_inputs.open_clip_tokens(tok, 16, texts)[0], want)
    # the transformers tokenizer alone reads a prompt's "!" as laion's pad token, id 0; open_clip as "!</w>"
    assert tok("dog!").input_ids[2] == 0 and ids[6, 2] == tok.convert_tokens_to_ids("!</w>")


def test_open_clip_clean_applies_ftfys_fixes():
    # open_clip's cleaning with ftfy 6.3 installed gives these (measured; ftfy is not a dependency here)
    clean = reward_inputs.open_clip_clean
    assert clean("A dog\u2019s \u201ctoy\u201d") == 'a dog\'s "toy"'  # curly quotes straightened
    assert clean("\uff23\uff41\uff54\uff0c\u3000dog\uff01") == "cat, dog!"  # fullwidth forms, wide space
    assert clean("\ufeff\ufb01sh \u0133s") == "fish ijs"  # byte-order mark dropped, ligatures split
    assert clean("&amp;amp;amp; &lt;b&gt;") == "& <b>"  # ftfy unescapes once more when there is no "<"
