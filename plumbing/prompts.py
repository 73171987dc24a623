"""
Where prompts come from: a text file, the toy grammar, or a named public prompt set. A named set is downloaded
on first use, kept as a text file of one prompt per line in the cache (~/.cache/chunk-grpo/prompts, or
$CHUNK_GRPO_CACHE/prompts) and read from there ever after; offline, the error names the file to place.

    --prompts hpdv2:train      the HPDv2 prompts (arXiv 2306.09341) GCPO and DanceGRPO train on
    --prompts hpdv2:test       the HPDv2 test prompts GCPO reports on
    --prompts pickapic:train   Pick-a-Pic (arXiv 2305.01569) as Flow-GRPO split it, its SD3.5 recipe
    --prompts pickapic:test
"""

import json
import os
import urllib.request
from pathlib import Path

import torch

from plumbing import toy
from plumbing.runtime import UsageError

FLOW_GRPO = "https://raw.githubusercontent.com/yifan123/flow_grpo/main/dataset/pickscore"
# name: (hub dataset and file, or a URL of a text file). HPDv2's train.json and test.json are lists of records
# with a "prompt" field, one record per compared pair: each prompt is kept once, in file order. Flow-GRPO's
# Pick-a-Pic split is a random shuffle of deduplicated captions that only its repository holds: URLs.
PROMPT_SETS = {
    "hpdv2:train": ("ymhao/HPDv2", "train.json"),
    "hpdv2:test": ("ymhao/HPDv2", "test.json"),
    "pickapic:train": (f"{FLOW_GRPO}/train.txt", None),
    "pickapic:test": (f"{FLOW_GRPO}/test.txt", None),
}


def cache_file(name: str) -> Path:
    """Where the named prompt set lives once downloaded: one prompt per line."""
    root = Path(os.environ.get("CHUNK_GRPO_CACHE") or Path.home() / ".cache" / "chunk-grpo")
    return root / "prompts" / f"{name.replace(':', '_')}.txt"


def download(name: str) -> list[str]:
    """The prompts of a named set, from its source (raises OSError when it cannot be reached)."""
    source, filename = PROMPT_SETS[name]
    if filename is None:
        with urllib.request.urlopen(source, timeout=60) as response:
            lines = response.read().decode("utf-8").splitlines()
    else:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(source, filename, repo_type="dataset")
        lines = [record["prompt"] for record in json.loads(Path(path).read_text(encoding="utf-8"))]
    return list(dict.fromkeys(p.strip() for p in lines if p.strip()))  # once each, in order


def resolve(spec: str) -> Path:
    """The text file behind --prompts: the spec itself, or a named set's cache file (downloaded if absent)."""
    if Path(spec).is_file() or spec not in PROMPT_SETS:
        return Path(spec)
    cached = cache_file(spec)
    if cached.is_file():
        return cached
    source, filename = PROMPT_SETS[spec]
    where = source if filename is None else f"hub dataset {source} ({filename})"
    try:
        prompts = download(spec)
    except OSError as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(
            f"prompt set {spec} is not cached and could not be downloaded from {where} ({reason}); place its "
            f"prompts, one per line, in {cached}"
        ) from None
    except (KeyError, TypeError, ValueError) as e:  # the source changed its layout
        raise UsageError(
            f"prompt set {spec}: {where} is not a list of records with a 'prompt' field ({e!r}); place its "
            f"prompts, one per line, in {cached}"
        ) from None
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f"{cached.name}.{os.getpid()}.tmp")  # every rank may download: rename atomically
    tmp.write_text("".join(p + "\n" for p in prompts), encoding="utf-8")
    os.replace(tmp, cached)
    return cached


class PromptSource:
    """The prompts of every script: a text file (one prompt a line, blank lines skipped), a named set (above),
    or the toy grammar.

    Specs: FILE, a PROMPT_SETS name, `toy:train`, `toy:heldout`, or `toy`, the split the script is for
    (`toy_split`: train for the trainers, held-out for eval.py and chunking.py). Training draws a fresh batch
    each iteration (`draw`); evaluation reads a fixed list (`head`): a file's lines in order, or the toy
    grammar's list of seed 1, the held-out prompts `python -m scripts.pretrain_toy --eval-only` scores
    (fixed: a script's --seed varies the noise, not the benchmark).
    """

    TOY_LIST_SEED = 1
    TOY_LIST_SIZE = 250  # the toy list's length when none is asked for

    def __init__(self, spec: str, toy_split: str = "train"):
        self.lines = None
        if spec in ("toy", "toy:train", "toy:heldout"):
            self.split = toy_split if spec == "toy" else spec.split(":")[1]
            return
        self.split = None
        path = resolve(spec)
        if not path.is_file():
            names = ", ".join(PROMPT_SETS)
            raise UsageError(
                f"prompts file {spec!r} not found; pass --prompts FILE (one prompt per line), a named set "
                f"({names}) or toy"
            )
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            text = "\0"
        if "\0" in text:  # a binary file, or text in another encoding
            raise UsageError(f"prompts file {str(path)!r} is not UTF-8 text; it needs one prompt per line")
        self.lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not self.lines:
            raise UsageError(f"prompts file {str(path)!r} has no prompts; it needs one prompt per line")

    @property
    def is_toy(self) -> bool:
        return self.lines is None

    def draw(self, n: int, seed: int) -> list[str]:
        """n prompts drawn afresh from the seed: distinct unless a file holds fewer than n."""
        if self.is_toy:
            return toy.sample_prompts(self.split, n, seed)
        g = torch.Generator().manual_seed(seed)
        if n <= len(self.lines):
            idx = torch.randperm(len(self.lines), generator=g)[:n]
        else:
            idx = torch.randint(len(self.lines), (n,), generator=g)
        return [self.lines[i] for i in idx.tolist()]

    def head(self, n: int | None = None) -> list[str]:
        """The first n prompts of the fixed list (all of a file's when n is None)."""
        if self.is_toy:
            return toy.sample_prompts(self.split, self.TOY_LIST_SIZE if n is None else n, self.TOY_LIST_SEED)
        return self.lines[:n]


def outside_toy_grammar(prompts) -> str | None:
    """The first prompt the toy grammar cannot parse (the toy reward and model know no other), or None."""
    for prompt in prompts:
        try:
            toy.parse(prompt)
        except ValueError:
            return prompt
    return None
