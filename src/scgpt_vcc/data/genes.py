"""Gene lists: the VCC ``gene_names.csv`` format (one symbol per line, no header)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from scgpt_vcc.errors import InputError
from scgpt_vcc.io import write_text_atomic


def read_gene_list(path: str | Path) -> list[str]:
    """Read a header-less gene list.

    Reading ``gene_names.csv`` with a CSV reader that assumes a header silently drops the
    first gene; this reader takes every non-empty line as a gene symbol.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file", "does not exist", "check the gene_names path in the config")
    genes = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not genes:
        raise InputError(path, "genes", "the file is empty", "list one gene symbol per line")
    if "," in genes[0]:
        raise InputError(
            path,
            "line 1",
            f"{genes[0]!r} has several columns",
            "write one gene symbol per line, no header, no other columns",
        )
    duplicated = sorted(gene for gene, n in Counter(genes).items() if n > 1)
    if duplicated:
        raise InputError(
            path, "genes", f"duplicated symbols {duplicated[:5]}", "list each gene once"
        )
    return genes


def write_gene_list(genes: Sequence[str], path: str | Path) -> None:
    """Write genes in the VCC format: one per line, no header, no trailing newline."""
    write_text_atomic(path, "\n".join(genes))
