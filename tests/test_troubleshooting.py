"""docs/troubleshooting.md lists every error field the code reports, and nothing else.

Each section of the document names its source modules (``Source: `data/convert.py` ``) and
has a table whose first column holds the reported fields in backticks. The fields of the
code are read from the ``InputError(path, field, ...)`` calls: constant strings as they
are, f-strings with each ``{expr}`` written as ``<expr>``. Fields that are variables are
documented as ``<name>`` placeholders; a documented field's literal text must occur in the
section's source modules.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "scgpt_vcc"
DOC = REPO / "docs" / "troubleshooting.md"
WORKFLOW_SOURCE = "workflow/rules/common.smk"


def _sections() -> list[tuple[list[str], list[list[str]]]]:
    """(source modules, fields of each table row) per section with a ``Source:`` line."""
    sections = []
    for block in re.split(r"^## ", DOC.read_text(), flags=re.M)[1:]:
        source = re.search(r"^Source: (.+)$", block, flags=re.M)
        if source is None:
            continue
        rows = [
            re.findall(r"`([^`]+)`", line.split("|")[1])
            for line in block.splitlines()
            if line.startswith("| `")
        ]
        sections.append((re.findall(r"`([^`]+)`", source.group(1)), rows))
    return sections


def _template(node: ast.expr, src: str) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(
            part.value
            if isinstance(part, ast.Constant)
            else f"<{ast.get_source_segment(src, part.value)}>"
            for part in node.values
        )
    return None  # a variable: documented as a <placeholder>


def _code_fields(module: Path) -> tuple[set[str], int, set[str]]:
    """Templates of the constant/f-string fields, number of InputErrors, all string pieces."""
    src = module.read_text()
    tree = ast.parse(src)
    calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "InputError"
    ]
    fields = {t for call in calls if (t := _template(call.args[1], src)) is not None}
    strings = {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }
    return fields, len(calls), strings


def _modules_with_errors() -> set[str]:
    return {
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if path.name != "errors.py" and _code_fields(path)[1]
    }


def test_every_module_with_input_errors_has_a_section() -> None:
    documented = {m for modules, _ in _sections() for m in modules}
    assert _modules_with_errors() <= documented


@pytest.mark.parametrize("module", sorted(_modules_with_errors()))
def test_every_reported_field_is_documented(module: str) -> None:
    fields, _, _ = _code_fields(PACKAGE / module)
    documented = {f for modules, rows in _sections() if module in modules for r in rows for f in r}
    assert fields - documented == set(), f"add these fields of {module} to {DOC.name}"


def test_every_documented_field_exists_in_its_modules() -> None:
    for modules, rows in _sections():
        if modules == [WORKFLOW_SOURCE]:
            continue
        strings = set().union(*(_code_fields(PACKAGE / m)[2] for m in modules))
        for field in (f for row in rows for f in row):
            pieces = [p for p in re.split(r"<[^>]*>", field) if p]
            missing = [p for p in pieces if not any(p in s for s in strings)]
            assert not missing, f"{field!r} ({', '.join(modules)}) is not in the code"


def test_every_workflow_error_has_a_row() -> None:
    raised = sum(
        p.read_text().count("raise WorkflowError(") for p in REPO.glob("workflow/**/*.smk")
    )
    [rows] = [rows for modules, rows in _sections() if modules == [WORKFLOW_SOURCE]]
    assert len(rows) == raised
