"""
What each reward model reads, prepared as its official code prepares it, in torch and on the batch's device:

- pixels: each processor's PIL path (uint8 image, PIL bicubic, crop or pad, normalise), emulated on float
  tensors (`preprocess`; `qwen2vl_pixels`, Qwen2-VL's patches), so no image goes through PIL or disk;
- HPSv3's text: its instruction around the prompt in one Qwen2-VL user turn, the image's <|image_pad|> tokens
  spelled out (`hpsv3_texts`; MizzenAI/HPSv3, hpsv3/dataset/data_collator_qwen.py);
- open_clip's text (HPSv2.1, DFN5B): open_clip's cleaning and token ids (`open_clip_tokens`;
  mlfoundations/open_clip, src/open_clip/tokenizer.py, SimpleTokenizer with its default "lower" cleaning).

A transformers CLIP tokenizer gives other ids than open_clip's for three kinds of prompt: it does not unescape
HTML (`&amp;`), it does not run ftfy (curly quotes, fullwidth commas), and with the laion tokenizers' pad
token "!" every "!" in a prompt becomes that special token, id 0, instead of its BPE tokens
(huggingface/diffusers issue 4153). PickScore was trained through the transformers tokenizer and keeps it.
"""

import html
import math
import unicodedata

import torch
import torch.nn.functional as F

from plumbing.runtime import UsageError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's pixel normalisation, kept by every model here
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
HPSV3_PIXELS = 256 * 28 * 28  # HPSv3 sets min_pixels = max_pixels: ~448 x 448 images, 256 visual tokens
# HPSv3's training text: the user turn of hpsv3/dataset/data_collator_qwen.py verbatim, trailing spaces too
HPSV3_INSTRUCTION = (
    "\nYou are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give "
    "a overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being "
    "the worst and 10 being the best. \n\n**Visual Quality:**  \nEvaluate the overall visual quality of the "
    "image. The following sub-dimensions should be considered:\n- **Reasonableness:** The image should not "
    "contain any significant biological or logical errors, such as abnormal body structures or nonsensical "
    "environmental setups.\n- **Clarity:** Evaluate the sharpness and visibility of the image. The image "
    "should be clear and easy to interpret, with no blurring or indistinct areas.\n- **Detail Richness:** "
    "Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, "
    "clothing, shadows).\n- **Aesthetic and Creativity:** Assess the artistic aspects of the image, "
    "including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. "
    "The scene should convey a sense of harmony and balance.\n- **Safety:** The image should not contain "
    "harmful or inappropriate content, such as political, violent, or adult material. If such content is "
    "present, the image quality and satisfaction score should be the lowest possible. \n\n**Text "
    "Alignment:**  \nAssess how well the image matches the textual prompt across the following "
    "sub-dimensions:\n- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., "
    "person, animal, object) align with the textual description. The subject should match the description in "
    "terms of number, appearance, and behavior.\n- **Style Relevance:** If the prompt specifies a particular "
    "artistic or stylistic style, evaluate how well the image adheres to this style.\n- **Contextual "
    "Consistency**: Assess whether the background, setting, and surrounding elements in the image logically "
    "fit the scenario described in the prompt. The environment should support and enhance the subject "
    "without contradictions.\n- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt "
    "(e.g., colors, clothing, accessories, expressions, actions) are faithfully represented in the image. "
    "Minor deviations may be acceptable, but critical attributes should be preserved.\n- **Semantic "
    "Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the image. "
    "The generated content should not introduce elements that conflict with or distort the original "
    "description.\nTextual prompt - {text_prompt}\n\n\n\nPlease provide the overall ratings of this image: "
    "<|Reward|>\n\nEND\n"
)
# Qwen2-VL's chat template rendered for one user turn (image, then text) plus the generation prompt, written
# out so the prompt is visible here and does not depend on the template a tokenizer ships with.
HPSV3_CHAT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>{image}"
    "<|vision_end|>{text}<|im_end|>\n<|im_start|>assistant\n"
)
# What ftfy.fix_text (open_clip's first cleaning step) changes in prompts, as a translation table (ftfy 6,
# chardata.py): curly quotes straightened, Latin ligatures split, fullwidth forms and the ideographic space
# made ASCII, stray control characters and the byte-order mark dropped. Its mojibake repair is not reproduced.
FTFY = dict.fromkeys([0x2BC, *range(0x2018, 0x201C)], "'") | dict.fromkeys(range(0x201C, 0x2020), '"')
LIGATURES = [0x132, 0x133, 0x149, *range(0x1C4, 0x1CD), *range(0x1F1, 0x1F4), *range(0xFB00, 0xFB07)]
FTFY |= {c: unicodedata.normalize("NFKC", chr(c)) for c in [*LIGATURES, *range(0xFF01, 0xFFF0)]}
FTFY |= {0xFB05: "\u017ft", 0x3000: " "}  # ftfy's exceptions to NFKC: the long-s ligature, the wide space
CONTROL = [*range(0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF]
CONTROL += range(0xFFF9, 0xFFFD)
FTFY |= dict.fromkeys(CONTROL)


# ----------------------------------------------------------------------------- preprocessing, in torch
def _resize(x: torch.Tensor, h: int, w: int, interpolation="bicubic", pil=True) -> torch.Tensor:
    """Antialiased resize of (N, C, H, W) floats; antialiased bicubic is PIL's filter (a = -0.5, wide support)

    pil=True also follows PIL's two passes, each clipped to [0, 1] (uint8): width, then height, except that
    Pillow 13 runs the height pass first when it removes more than twice as many rows as the width pass
    removes columns (python-pillow/Pillow, src/libImaging/Resample.c, ImagingResampleInner). Bicubic
    overshoots at sharp edges, so the order matters: the other order differs from PIL by up to 24/255.
    pil=False is torchvision's resize of a float tensor (HPSv2's path): one pass, no clipping, antialiased
    (the default since torchvision 0.17).
    """
    import PIL

    ih, iw = x.shape[-2:]
    height_first = int(PIL.__version__.split(".")[0]) >= 13 and ih - h > max(0, 2 * (iw - w))
    sizes = [(h, iw), (h, w)] if height_first else [(ih, w), (h, w)]
    for size in sizes if pil else [(h, w)]:
        if x.shape[-2:] != size:
            x = F.interpolate(x, size, mode=interpolation, antialias=True, align_corners=False)
            x = x.clamp(0, 1) if pil else x
    return x


def _normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    return (x - x.new_tensor(mean).view(1, -1, 1, 1)) / x.new_tensor(std).view(1, -1, 1, 1)


def preprocess(images, size, mean=OPENAI_MEAN, std=OPENAI_STD, *, mode="shortest", interpolation="bicubic"):
    """(N, 3, H, W) in [0, 1] -> normalised (N, 3, size, size) float32: a processor's PIL path, in torch.

    "shortest": short side -> size, long side int(size * long / short), centre crop (CLIPImageProcessor;
    torchvision Resize(int) + CenterCrop); "longest": long side -> size, short side rounded, zero-padded to a
    square before normalising (HPSv2's ResizeMaxSize on a tensor); "squash": straight to size x size.
    Gap to the PIL path (uint8 in, rounded to 1/255 between and after its two passes): at most 1.1/255 and
    ~0.3/255 on average in [0, 1] units, for 32..1280 px inputs to 224 px, noise included (was 12/255 with a
    fixed width-first order; tests/test_reward_inputs.py).
    An odd crop margin starts at floor(margin / 2) as in transformers; torchvision rounds it, a pixel further.
    """
    x = images.float()
    h, w = x.shape[-2:]
    if mode == "shortest":
        oh, ow = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    elif mode == "longest":
        scale = size / max(h, w)  # round(dim * scale) as HPSv2's ResizeMaxSize: one pixel apart from
        oh, ow = round(h * scale), round(w * scale)  # round(dim * size / max) for 28 sizes up to 2048 px
    elif mode == "squash":
        oh, ow = size, size
    else:
        raise UsageError(f"unknown resize mode {mode!r}; choose shortest, longest or squash")
    x = _resize(x, oh, ow, interpolation, pil=mode != "longest")  # (N, 3, oh, ow)
    if mode == "longest":  # black (0) borders, before normalising, as HPSv2 pads
        top, left = (size - oh) // 2, (size - ow) // 2
        x = F.pad(x, (left, size - ow - left, top, size - oh - top))  # (N, 3, size, size)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[..., top : top + size, left : left + size]  # (N, 3, size, size)
    return _normalize(x, mean, std)


def smart_resize(h, w, factor=28, min_pixels=HPSV3_PIXELS, max_pixels=HPSV3_PIXELS) -> tuple[int, int]:
    """Qwen2-VL's size rule: sides multiples of `factor`, area in [min_pixels, max_pixels], aspect kept."""
    hb, wb = max(factor, round(h / factor) * factor), max(factor, round(w / factor) * factor)
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        hb, wb = math.floor(h / beta / factor) * factor, math.floor(w / beta / factor) * factor
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        hb, wb = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return hb, wb


def qwen2vl_pixels(images, patch=14, merge=2, temporal=2, min_pixels=HPSV3_PIXELS, max_pixels=HPSV3_PIXELS):
    """(N, 3, H, W) in [0, 1] -> Qwen2-VL `pixel_values` (N gh gw, 3 T p^2) and `image_grid_thw` (N, 3).

    HPSv3 resizes with PIL bicubic to `smart_resize` (min = max pixels); the image processor then normalises
    and cuts patches: rows run over merge x merge blocks of patches, a row is (C, T, patch, patch) with the
    still image repeated over the T = 2 frames of a temporal patch.
    """
    n, c, h, w = images.shape
    oh, ow = smart_resize(h, w, patch * merge, min_pixels, max_pixels)
    x = _normalize(_resize(images.float(), oh, ow), OPENAI_MEAN, OPENAI_STD)  # (N, 3, oh, ow)
    gh, gw = oh // patch, ow // patch
    x = x.reshape(n, c, gh // merge, merge, patch, gw // merge, merge, patch).permute(0, 2, 5, 3, 6, 1, 4, 7)
    x = x.unsqueeze(6).expand(*x.shape[:6], temporal, patch, patch)  # (N, gh/m, gw/m, m, m, C, T, p, p)
    grid = torch.tensor([[1, gh, gw]] * n, device=images.device)  # (N, 3): frames, rows, columns of patches
    return x.reshape(n * gh * gw, c * temporal * patch * patch), grid


# ----------------------------------------------------------------------------- text
def hpsv3_texts(prompts: list[str], image_tokens: int) -> list[str]:
    """HPSv3's chat for each prompt, its image `image_tokens` <|image_pad|> tokens long (256 at 448 px)."""
    pads = "<|image_pad|>" * image_tokens
    return [HPSV3_CHAT.format(image=pads, text=HPSV3_INSTRUCTION.format(text_prompt=p)) for p in prompts]


def open_clip_clean(text: str) -> str:
    """open_clip's "lower" cleaning: ftfy.fix_text (it unescapes HTML once when the text has no "<", then the
    table above), HTML unescaped twice more, stripped, whitespace runs made one space, lowercased."""
    if "<" not in text:
        text = html.unescape(text)
    text = html.unescape(html.unescape(text.translate(FTFY))).strip()
    return " ".join(text.split()).lower()


def clip_tokens(tokenizer, max_length: int, prompts: list[str]):
    """(ids, mask), each (N, L): a transformers CLIP tokenizer's, called as PickScore's processor is."""
    t = tokenizer(prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return t.input_ids, t.attention_mask


def open_clip_tokens(tokenizer, context_length: int, prompts: list[str]):
    """(ids, None): (N, context_length) ids as open_clip's tokenizer gives them, <start> BPE <end> cut to the
    context with <end> kept last and padded with 0 (which is "!": open_clip pads with zeros, not with a pad
    token), and no mask, as open_clip's causal text tower reads them (nothing before <end> sees the padding).

    `tokenizer` is a transformers CLIP tokenizer, used for its BPE only: special tokens in the text are read
    as text (so "!" keeps its own tokens) and its padding is replaced by open_clip's zeros.
    """
    texts = [open_clip_clean(p) for p in prompts]
    t = tokenizer(
        texts,
        padding="max_length",
        truncation=True,
        max_length=context_length,
        split_special_tokens=True,
        return_tensors="pt",
    )
    return t.input_ids.masked_fill(t.attention_mask == 0, 0), None
