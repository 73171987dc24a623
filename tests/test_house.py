"""The house rules a reader relies on: the method on top and the plumbing below, one formatter, imports
that go one way, files within their size budgets, README line counts that are true, and no pointer outside
the repository."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The top level, and nothing else: the design's six files and the likelihood-free objective beside them.
METHOD = ["sampler", "chunking", "rewards", "train_grpo", "train_chunk", "train_awm", "eval"]
# The reading order, bottom to top: a module imports only modules of lower layers.
LAYERS = [
    ["plumbing.toy", "plumbing.recipes"],  # the world, and the published recipes: import nothing of ours
    ["plumbing.runtime"],  # user errors, the entry point, torchrun
    ["plumbing.lora", "plumbing.prompts", "plumbing.ema"],
    ["plumbing.checkpoints"],  # a run's folder: checkpoints, resume
    ["plumbing.metrics"],  # its log, metrics.jsonl, and the guard that names its last good checkpoint
    ["plumbing.tables_and_figures"],
    ["plumbing.models", "plumbing.reward_loading", "plumbing.reward_inputs"],  # what the method calls
    ["sampler"],  # the SDE and rollouts: the method starts here
    ["chunking", "rewards"],
    ["train_grpo", "eval"],
    ["train_chunk", "train_awm"],  # the objectives that reuse the loop
    [
        "scripts.bench",
        "scripts.pretrain_toy",
        "scripts.ablations",
        "scripts.gradient_snr",
        "scripts.signal_vs_drift",
        "scripts.learning_curves",
    ],
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}
TRAINERS = ("train_grpo.py", "train_chunk.py", "train_awm.py")
BUDGET = {"trainer": 450, "other": 350}  # lines


def module_files() -> dict[str, Path]:
    """Every module of the house, by its import name: the top level, plumbing/ and scripts/."""
    found = {p.stem: p for p in ROOT.glob("*.py")}
    for package in ("plumbing", "scripts"):
        found |= {f"{package}.{p.stem}": p for p in (ROOT / package).glob("*.py") if p.stem != "__init__"}
    return found


def project_imports(path: Path) -> set[str]:
    """Every project module `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}  # from plumbing import toy
    return found & set(LAYER)


def test_the_top_level_is_the_method():
    assert {p.stem for p in ROOT.glob("*.py")} == set(METHOD)


def test_every_module_has_a_layer():
    assert set(module_files()) == set(LAYER)


@pytest.mark.parametrize("name", sorted(LAYER))
def test_imports_go_down_only(name):
    upward = {m for m in project_imports(module_files()[name]) if LAYER[m] >= LAYER[name]}
    assert not upward, f"{name} imports {sorted(upward)} from its own layer or above"


def test_the_step_level_trainer_does_not_import_its_extension():
    assert "chunking" not in project_imports(ROOT / "train_grpo.py")


def test_files_keep_their_size_budget():
    for name, path in sorted(module_files().items()):
        budget = BUDGET["trainer" if path.name in TRAINERS else "other"]
        lines = len(path.read_text().splitlines())
        assert lines < budget, f"{name} has {lines} lines; its budget is under {budget}"


def test_the_readmes_line_counts_are_the_files():
    rows = re.findall(r"^\| `([\w/.]+)` \| (\d+) \|", (ROOT / "README.md").read_text(), flags=re.M)
    assert len(rows) >= len(module_files())
    for name, count in rows:
        paths = [ROOT / name] if (ROOT / name).is_file() else sorted((ROOT / name).glob("*.py"))
        lines = sum(len(p.read_text().splitlines()) for p in paths)
        assert int(count) == lines, f"README says {name} has {count} lines; it has {lines}"


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
