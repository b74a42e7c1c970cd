"""The package's imports flow one way: data -> model -> train / predict -> evaluate ->
submission / submission_counts (VCC 2025 / 2026 form) -> cli, with errors, then io and
stats, beneath everything.

A module may import its own subpackage and any lower layer, never a higher one or a peer
(training and prediction do not import each other). Function-level imports count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "scgpt_vcc"
LAYERS = {
    "errors": 0,
    "io": 1, "stats": 1, "precisions": 1,
    "data": 2,
    "model": 3,
    "train": 4, "predict": 4,
    "evaluate": 5,
    "submission": 6, "submission_counts": 6,
    "cli": 7,
}  # fmt: skip


def _unit(module: Path) -> str:
    """Top-level unit of a module: its subpackage, or the module itself."""
    return module.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imported_units(module: Path) -> set[str]:
    units = set()
    for node in ast.walk(ast.parse(module.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "scgpt_vcc" and len(parts) > 1:
                units.add(parts[1])
    return units


def test_every_unit_has_a_layer():
    modules = [m for m in PACKAGE.rglob("*.py") if m.name != "__init__.py" or m.parent != PACKAGE]
    assert {_unit(m) for m in modules} == set(LAYERS)


def test_imports_point_down_only():
    upward = []
    for module in PACKAGE.rglob("*.py"):
        if module.parent == PACKAGE and module.name == "__init__.py":
            continue
        unit = _unit(module)
        for target in _imported_units(module) - {unit}:
            if LAYERS[target] >= LAYERS[unit]:
                upward.append(f"{module.relative_to(PACKAGE)} imports {target}")
    assert not upward, upward
