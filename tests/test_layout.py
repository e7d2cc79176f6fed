"""The tree's shape: the root holds only the command lines, and imports only go down the layers, so
each package can be read (and tested) with only the ones below it in mind."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMAND_LINES = {"train", "generate", "evaluate", "serve", "export", "sweep", "average"}
# Lowest first: a package imports only from the layers below its own (and from itself).
LAYERS = [{"common"}, {"lora", "quant"}, {"gemma"}, {"data"}, {"training", "evaluation", "serving", "gguf_export"}, {"bench"}]
LAYER_OF = {package: level for level, packages in enumerate(LAYERS) for package in packages}


def project_imports(path: Path) -> set[str]:
    """The top-level names of this project that a file imports (absolute imports only)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & (set(LAYER_OF) | COMMAND_LINES)


def test_the_root_holds_only_the_command_lines():
    assert {path.stem for path in ROOT.glob("*.py")} == COMMAND_LINES


def test_every_package_is_in_a_layer():
    packages = {path.parent.name for path in ROOT.glob("*/__init__.py")} - {"tests"}
    assert packages == set(LAYER_OF)


def test_imports_only_go_down():
    upward = []
    for package, level in LAYER_OF.items():
        for path in (ROOT / package).rglob("*.py"):
            for name in project_imports(path) - {package}:
                if name in COMMAND_LINES or LAYER_OF[name] >= level:
                    upward.append(f"{path.relative_to(ROOT)} imports {name}")
    assert upward == []
