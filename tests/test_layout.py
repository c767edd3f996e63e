"""The package's layout is its architecture: each folder one layer, and imports only go down (or sideways within a
layer), never up; the README's map names every module."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "finetune"
# Layers, lowest first: a module may import its own layer and those below, never one above.
LAYERS = {
    "finetune": 0, "finetune.errors": 0, "finetune.logs": 0,  # the version, exit codes, console lines
    "finetune.recipe": 1, "finetune.kernels": 1,  # what a run is asked to do; torch-level speed kernels
    "finetune.data": 2, "finetune.model": 2, "finetune.embedded": 2,  # the examples and the model
    "finetune.training": 3, "finetune.tracking": 3,  # a run: the Trainer, its directory, its metrics, W&B
    "finetune.run": 4,  # the training entry point
    "finetune.commands": 5, "finetune.cli": 5, "finetune.__main__": 5,  # what users run
}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    while module not in LAYERS:
        module = module.rpartition(".")[0]
    return LAYERS[module]


def imported(path: Path) -> set[str]:
    """Every finetune module `path` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "finetune":
            for alias in node.names:  # `from finetune.data import load`: the module finetune.data.load
                candidate = f"{node.module}.{alias.name}"
                is_module = (PACKAGE.parent / (candidate.replace(".", "/") + ".py")).is_file()
                found.add(candidate if is_module else node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "finetune"}
    return found


def test_imports_never_go_up_a_layer():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        upward += [f"{name} (layer {layer(name)}) imports {target} (layer {layer(target)})"
                   for target in sorted(imported(path)) if layer(target) > layer(name)]
    assert upward == []


def test_the_readme_map_names_every_folder_and_module():
    """Each folder has its row in the README's map (`| `data/` | ...`), and each module is named in its folder's row."""
    readme = (REPO / "README.md").read_text()
    rows = dict(re.findall(r"^\| `([\w/]+/)` \| (.*) \|$", readme[readme.index("## Where things live"):], re.MULTILINE))
    folders = {path.parent for path in PACKAGE.rglob("*.py")}
    assert set(rows) == {"finetune/" if folder == PACKAGE else f"{folder.name}/" for folder in folders}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name not in ("__init__.py", "__main__.py"):
            row = rows["finetune/" if path.parent == PACKAGE else f"{path.parent.name}/"]
            assert f"`{path.name}`" in row, f"{path.relative_to(REPO)} is not in the README's map"
