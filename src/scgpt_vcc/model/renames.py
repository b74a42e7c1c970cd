"""Data genes under the symbols HGNC has given them since: more genes matched to the vocabulary.

The VCC file names genes as they were before some of HGNC's renames (``YARS``, ``MARCH7``,
``H2AFZ``, ``HIST1H4C``); the scGPT whole-human vocabulary has the current symbols
(``YARS1``, ``MARCHF7``, ``H2AZ1``, ``H4C3``), so 240 of the 18,080 VCC genes miss it.

With HGNC's complete set (``hgnc_complete_set.txt``: tab-separated, with the columns
``symbol``, ``prev_symbol`` and ``alias_symbol``, several values of a field separated by
``|``), a data gene outside the vocabulary is matched to the current symbol that lists it as
a previous symbol (or, when none does, as an alias) when that is unambiguous:

* exactly one such symbol is in the vocabulary;
* that symbol is not a data gene itself (two columns would share one token);
* no other data gene maps to it.

The data keep their own gene names; only the token a gene is fed with changes
(:func:`scgpt_vcc.model.vocab.match_genes`). Without the table, the report lists the likely
renames it can see from HGNC's systematic patterns (:data:`LIKELY_PATTERNS`), to check
and apply through a table; they are not applied.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from scgpt_vcc.data.gears import gene_symbols
from scgpt_vcc.errors import InputError
from scgpt_vcc.io import read_annotations, read_json, write_json_atomic
from scgpt_vcc.model.checkpoint import read_vocab

log = logging.getLogger(__name__)

HGNC_COLUMNS = ("symbol", "prev_symbol", "alias_symbol")
# Systematic renames: aminoacyl-tRNA synthetases (YARS -> YARS1), MARCH -> MARCHF,
# SEPT -> SEPTIN, MARC -> MTARC.
LIKELY_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"^([A-Z]ARS|EPRS)$", r"\g<1>1"),
    (r"^MARCH(\d+)$", r"MARCHF\1"),
    (r"^SEPT(\d+)$", r"SEPTIN\1"),
    (r"^MARC(\d)$", r"MTARC\1"),
)


@dataclass(frozen=True)
class HgncTable:
    """Current symbols by earlier name: ``previous`` (renames) and ``alias``."""

    previous: dict[str, set[str]]
    alias: dict[str, set[str]]


def _split(field: object) -> list[str]:
    if not isinstance(field, str):
        return []
    return [v.strip() for v in field.strip().strip('"').split("|") if v.strip()]


def read_hgnc_table(path: str | Path) -> HgncTable:
    """Read HGNC's complete set (or a file with its three columns)."""
    path = Path(path)
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, usecols=lambda c: c in HGNC_COLUMNS)
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise InputError(
            path, "file", f"is not a readable tab-separated table ({err})", "check hgnc_table"
        ) from err
    missing = [c for c in HGNC_COLUMNS if c not in table.columns]
    if missing:
        raise InputError(
            path,
            ", ".join(missing),
            "column missing",
            "use HGNC's complete set (hgnc_complete_set.txt), tab-separated, with the "
            "columns symbol, prev_symbol and alias_symbol",
        )
    previous: dict[str, set[str]] = {}
    alias: dict[str, set[str]] = {}
    for symbol, prev, aliases in table[list(HGNC_COLUMNS)].itertuples(index=False):
        if not isinstance(symbol, str) or not symbol.strip():
            continue
        for name in _split(prev):
            previous.setdefault(name, set()).add(symbol.strip())
        for name in _split(aliases):
            alias.setdefault(name, set()).add(symbol.strip())
    return HgncTable(previous, alias)


def resolve_renames(
    genes: Sequence[str], vocab: Mapping[str, int], table: HgncTable
) -> tuple[dict[str, str], dict[str, str]]:
    """``(renames, refused)``: data gene -> vocabulary symbol where unambiguous (module
    doc), and data gene -> why a candidate was not used."""
    data = set(genes)
    proposed: dict[str, str] = {}
    refused: dict[str, str] = {}
    for gene in genes:
        if gene in vocab:
            continue
        for kind, names in (("previous symbol", table.previous), ("alias", table.alias)):
            candidates = sorted(s for s in names.get(gene, ()) if s in vocab)
            if len(candidates) > 1:
                refused[gene] = f"{kind} of several vocabulary symbols {candidates}"
            elif candidates and candidates[0] in data:
                refused[gene] = f"{kind} of {candidates[0]}, itself a data gene"
            elif candidates:
                proposed[gene] = candidates[0]
            if candidates:
                break
    targets = pd.Series(proposed, dtype=object)
    shared = targets[targets.duplicated(keep=False)]
    for gene, symbol in shared.items():
        refused[gene] = f"{symbol} is claimed by several data genes {sorted(shared.index)}"
        del proposed[gene]
    return proposed, refused


def likely_renames(genes: Sequence[str], vocab: Mapping[str, int]) -> dict[str, str]:
    """Renames by :data:`LIKELY_PATTERNS` whose new symbol is in the vocabulary and is not a
    data gene; a report, not applied."""
    data = set(genes)
    found = {}
    for gene in genes:
        if gene in vocab:
            continue
        for pattern, replacement in LIKELY_PATTERNS:
            symbol = re.sub(pattern, replacement, gene)
            if symbol != gene and symbol in vocab and symbol not in data:
                found[gene] = symbol
                break
    return found


def vocab_match_report(
    genes: Sequence[str], vocab: Mapping[str, int], hgnc_table: str | Path | None = None
) -> dict[str, Any]:
    """Coverage of ``genes`` by ``vocab`` before and after the renames of ``hgnc_table``."""
    exact = sum(g in vocab for g in genes)
    report: dict[str, Any] = {"n_genes": len(genes), "n_matched_exact": exact}
    if hgnc_table is None:
        renames, refused = {}, {}
        report["likely_renames"] = likely_renames(genes, vocab)
    else:
        renames, refused = resolve_renames(genes, vocab, read_hgnc_table(hgnc_table))
    n = max(len(genes), 1)
    report.update(
        hgnc_table=None if hgnc_table is None else str(hgnc_table),
        n_matched=exact + len(renames),
        percent_matched_exact=100 * exact / n,
        percent_matched=100 * (exact + len(renames)) / n,
        renames=renames,
        refused=refused,
        unmatched=[g for g in genes if g not in vocab and g not in renames],
    )
    return report


def write_vocab_match(
    processed: str | Path,
    vocab_path: str | Path,
    output: str | Path,
    hgnc_table: str | Path | None = None,
) -> dict[str, Any]:
    """``vocab_match.json``: the renames training and prediction use, and the coverage."""
    _, var = read_annotations(processed)
    report = vocab_match_report(list(gene_symbols(var)), read_vocab(vocab_path), hgnc_table)
    write_json_atomic(output, report)
    log.info(
        "vocabulary: %d of %d genes by symbol (%.2f%%), %d with renames (%.2f%%)%s",
        report["n_matched_exact"], report["n_genes"], report["percent_matched_exact"],
        report["n_matched"], report["percent_matched"],
        "" if hgnc_table else f"; no HGNC table: likely renames {report['likely_renames']}",
    )  # fmt: skip
    for gene, why in report["refused"].items():
        log.warning("not renamed: %s (%s)", gene, why)
    return report


def read_renames(path: str | Path | None) -> dict[str, str]:
    """The renames of a ``vocab_match.json`` (none without a file)."""
    if path is None:
        return {}
    report = read_json(path, "re-run match-vocabulary")
    renames = report.get("renames") if isinstance(report, dict) else None
    if not isinstance(renames, dict):
        raise InputError(path, "renames", "is missing", "re-run match-vocabulary")
    return {str(k): str(v) for k, v in renames.items()}
