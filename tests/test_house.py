"""The house rules a reader relies on: one formatter, imports that go one way, files within their size
budgets, and no pointer to a file outside the repository."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The reading order, bottom to top (README, "The files"): a file imports only files of lower layers.
LAYERS = [
    ["toy", "recipes"],  # the world, and the published recipes as presets: import nothing of ours
    ["runtime"],  # plumbing
    ["lora", "prompts"],  # LoRA adapters; prompt files, named sets and the toy grammar
    ["checkpoints", "metrics_log"],  # a run's folder: checkpoints, resume; metrics.jsonl
    ["report"],  # tables and figures
    ["models"],  # FLUX, SD3 and toy behind one interface
    ["sampler"],  # the SDE and rollouts
    ["toy_model", "chunking", "reward_models"],
    ["reward_inputs"],  # what reward models read: pixels and text
    ["rewards"],
    ["train_grpo", "eval"],
    ["train_chunk"],
    ["bench"],  # what an iteration costs: imports the trainers
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}
TRAINERS = ("train_grpo.py", "train_chunk.py")
BUDGET = {"trainer": 450, "other": 350}  # lines


def project_imports(path: Path) -> set[str]:
    """Every project module `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(LAYER)


def test_every_file_has_a_layer():
    assert {p.stem for p in ROOT.glob("*.py")} == set(LAYER)


@pytest.mark.parametrize("name", sorted(LAYER))
def test_imports_go_down_only(name):
    upward = {m for m in project_imports(ROOT / f"{name}.py") if LAYER[m] >= LAYER[name]}
    assert not upward, f"{name}.py imports {sorted(upward)} from its own layer or above"


def test_files_keep_their_size_budget():
    for path in sorted(ROOT.glob("*.py")):
        budget = BUDGET["trainer" if path.name in TRAINERS else "other"]
        lines = len(path.read_text().splitlines())
        assert lines < budget, f"{path.name} has {lines} lines; its budget is under {budget}"


def test_nothing_points_outside_the_repository():
    outside = ["../" + "shared", "PAPERS" + ".md"]  # spelled in two parts, so that this file passes too
    for path in ROOT.rglob("*"):
        skip = {".git", "runs", "__pycache__"} & set(path.relative_to(ROOT).parts)
        if path.is_file() and not skip and path.suffix in (".py", ".md", ".txt", ".toml", ".json", ""):
            text = path.read_text(errors="replace")
            assert not [s for s in outside if s in text], path


@pytest.mark.parametrize("command", [["format", "--check"], ["check"]])
def test_ruff_is_clean(command):
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", *command, "."], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:]
