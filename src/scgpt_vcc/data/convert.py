"""VCC -> GEARS: map the challenge's annotations to GEARS's and log-normalise the counts.

Mapping:

* ``obs[perturbation_column]`` ``"GENE"`` -> ``obs["condition"]`` ``"GENE+ctrl"``; the control
  label -> ``"ctrl"``; a missing label (NaN, None, empty or blank) is an error, or with
  ``drop_missing_labels`` its cell is left out; cells whose label is in ``exclude_labels``
  (guide calls that name no gene: ``unassigned``, ``multiplet``) are left out;
* cells without a single count are left out (there is nothing to normalise);
* each guide's knockdown of its target is measured, and with thresholds set, failed
  knockdowns are left out (:mod:`scgpt_vcc.data.knockdown`); both are recorded in ``uns``;
* ``obs["cell_type"]`` = each cell's context (cell line): the configured constant
  ``cell_type``, or with ``context_column`` that input column's value, so one dataset may
  hold several contexts (GEARS keys are ``{cell_type}_{condition}_{dose}``, so a context
  may not contain ``_``, and every kept cell needs one);
* ``var.index`` -> ``var["gene_name"]``; all other obs and var columns are kept;
* ``layers["counts"]`` = the raw counts; ``X`` = log1p(counts / cell total * target_sum),
  where target_sum defaults to the data's median total count, so predictions map back to
  the VCC scale (cell-eval normalises counts to the file's median depth the same way).
  It is recorded in ``uns["scgpt_vcc"]``.

The input is read twice in row chunks (totals, then normalisation), and the output is
written in the same chunks: memory holds one chunk, whatever the number of cells.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scgpt_vcc.data.gears import CONTEXT, CONTROL
from scgpt_vcc.data.knockdown import (
    KnockdownFilter,
    TargetExpression,
    filter_knockdown,
    knockdown_table,
    report_json,
)
from scgpt_vcc.errors import InputError
from scgpt_vcc.io import H5adStreamWriter, atomic_path, iter_row_chunks, read_annotations

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConversionSummary:
    n_cells: int
    n_genes: int
    n_control_cells: int
    n_perturbations: int
    target_sum: float
    median_total_counts: float
    n_unlabelled_cells: int  # left out: no label (drop_missing_labels)
    n_excluded_cells: int  # left out: a label in exclude_labels
    n_empty_cells: int  # left out: no counts
    n_knockdown_filtered_cells: int  # left out by the knockdown filter (off by default)


def gears_conditions(targets: pd.Series, control_label: str) -> pd.Categorical:
    """``GENE`` -> ``GENE+ctrl``, control label -> ``ctrl``."""
    values = targets.astype(str)
    conditions = np.where(values == control_label, CONTROL, values + f"+{CONTROL}")
    return pd.Categorical(conditions)


# var columns that hold gene symbols in common h5ad files, in order of preference.
SYMBOL_COLUMNS = ("gene_name", "gene_symbol", "gene_symbols", "feature_name", "symbol")


def gene_symbols(var: pd.DataFrame, path: str | Path) -> pd.Index:
    """Gene symbols of ``var``: its index, or a symbol column when the index is Ensembl IDs."""
    index = var.index.astype(str)
    if not index.str.match(r"^ENS[A-Z]*G\d+").mean() > 0.5:
        return pd.Index(index)
    for column in SYMBOL_COLUMNS:
        if column in var:
            log.info("var.index holds Ensembl IDs; using var[%r] as gene symbols", column)
            return pd.Index(var[column].astype(str))
    raise InputError(
        path,
        "var.index",
        "holds Ensembl gene IDs, not gene symbols, and no symbol column "
        f"({', '.join(SYMBOL_COLUMNS)}) exists",
        "add a var column 'gene_name' with the symbols (scGPT and GEARS match genes by symbol)",
    )


def _check_unique(index: pd.Index, field: str, what: str, path: str | Path) -> None:
    if index.has_duplicates:
        dups = index[index.duplicated()].unique()[:5].tolist()
        raise InputError(path, field, f"duplicated {what} {dups}", f"make the {what} unique")


def _label_column(obs: pd.DataFrame, perturbation_column: str, path: str | Path) -> pd.Series:
    if perturbation_column not in obs:
        raise InputError(
            path,
            f"obs[{perturbation_column!r}]",
            f"no such column (columns: {list(obs.columns)})",
            "set perturbation_column in the config to the column naming the targeted gene",
        )
    return obs[perturbation_column]


def labelled_cells(
    obs: pd.DataFrame,
    perturbation_column: str,
    path: str | Path = "<input>",
    *,
    drop_missing_labels: bool = False,
) -> np.ndarray:
    """Boolean mask of the cells that have a perturbation label.

    A missing label (NaN, None, empty or blank) would otherwise turn into a condition
    ``"nan+ctrl"``; it is an error unless ``drop_missing_labels``, which logs the count.
    """
    labels = _label_column(obs, perturbation_column, path)
    missing = (labels.isna() | labels.astype(str).str.strip().eq("")).to_numpy()
    n_missing = int(missing.sum())
    if n_missing and not drop_missing_labels:
        raise InputError(
            path,
            f"obs[{perturbation_column!r}]",
            f"{n_missing} cells have no label (NaN, None, empty or blank)",
            "label every cell with its target gene or the control label, "
            "or set convert.drop_missing_labels: true to drop them",
        )
    if n_missing:
        log.warning("dropping %d cells with no label in obs[%r]", n_missing, perturbation_column)
    return ~missing


def excluded_cells(
    obs: pd.DataFrame,
    perturbation_column: str,
    exclude_labels: Sequence[str],
    control_label: str,
    path: str | Path = "<input>",
) -> np.ndarray:
    """Boolean mask of the cells whose label is in ``exclude_labels``; logs each count."""
    if control_label in exclude_labels:
        raise InputError(
            "config",
            "convert.exclude_labels",
            f"lists the control label {control_label!r}",
            "remove it: the control cells are every perturbation's reference",
        )
    labels = _label_column(obs, perturbation_column, path).astype(str)
    excluded = labels.isin(list(exclude_labels)).to_numpy()
    counts = labels[excluded].value_counts()
    for label in exclude_labels:
        if label in counts:
            log.info("leaving out %d cells labelled %r (exclude_labels)", counts[label], label)
        else:
            log.warning("exclude_labels: no cell is labelled %r in %s", label, path)
    return excluded


def _perturbation_targets(
    obs: pd.DataFrame, perturbation_column: str, control_label: str, path: str | Path
) -> pd.Series:
    labelled_cells(obs, perturbation_column, path)
    targets = obs[perturbation_column].astype(str)
    if not (targets == control_label).any():
        labels = targets.value_counts().index[:5].tolist()
        raise InputError(
            path,
            f"obs[{perturbation_column!r}]",
            f"no cell has the control label {control_label!r} (most frequent values: {labels})",
            "set control_label in the config to the value that marks control cells",
        )
    return targets


def _check_cell_type(cell_type: str) -> None:
    if "_" in cell_type:
        raise InputError(
            "config",
            "cell_type",
            f"{cell_type!r} contains '_'",
            "choose a label without underscores; GEARS splits its keys on '_'",
        )


def _context_column(obs: pd.DataFrame, context_column: str, path: str | Path) -> pd.Series:
    if context_column not in obs:
        raise InputError(
            path,
            f"obs[{context_column!r}]",
            f"no such column (columns: {list(obs.columns)})",
            "set context_column in the config to the column naming each cell's context "
            "(cell line), or to null for one context",
        )
    return obs[context_column]


def input_contexts(
    obs: pd.DataFrame, context_column: str, path: str | Path = "<input>"
) -> pd.Categorical:
    """Each cell's context, ``obs[context_column]`` as strings; checked like a GEARS key."""
    values = _context_column(obs, context_column, path)
    field = f"obs[{context_column!r}]"
    missing = (values.isna() | values.astype(str).str.strip().eq("")).to_numpy()
    if missing.any():
        raise InputError(
            path,
            field,
            f"{int(missing.sum())} cells have no context (NaN, None, empty or blank)",
            "give every cell its context (cell line), or leave those cells out of the input",
        )
    values = values.astype(str)
    underscored = sorted(set(values[values.str.contains("_", regex=False)]))
    if underscored:
        raise InputError(
            path,
            field,
            f"contexts {underscored[:5]} contain '_'",
            "rename them without underscores; GEARS splits its keys on '_'",
        )
    return pd.Categorical(values.to_numpy())


def gears_annotations(
    obs: pd.DataFrame,
    var: pd.DataFrame,
    *,
    cell_type: str,
    control_label: str,
    perturbation_column: str,
    path: str | Path = "<input>",
    context_column: str | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return GEARS-style copies of ``obs`` and ``var`` (checked, nothing else changed).

    Every cell must have a perturbation label: drop the others first (:func:`labelled_cells`).
    The context is ``cell_type`` for every cell, or with ``context_column`` that column's.
    """
    if context_column is None:
        _check_cell_type(cell_type)
        contexts = pd.Categorical([cell_type] * len(obs))
    else:
        contexts = input_contexts(obs, context_column, path)
    targets = _perturbation_targets(obs, perturbation_column, control_label, path)
    symbols = gene_symbols(var, path)
    _check_unique(symbols, "var.index", "gene names", path)
    _check_unique(obs.index, "obs.index", "cell barcodes", path)
    unmeasured = sorted(set(targets) - {control_label} - set(symbols))
    if unmeasured:
        log.warning(
            "%d target genes are not among the measured genes (no knockdown can be read "
            "from the data for them): %s",
            len(unmeasured),
            unmeasured[:20],
        )

    obs = obs.copy()
    obs["condition"] = gears_conditions(targets, control_label)
    obs[CONTEXT] = contexts
    var = var.copy()
    if not symbols.equals(var.index.astype(str)) and "gene_id" not in var:
        var["gene_id"] = var.index.astype(str)
    var.index = symbols
    var["gene_name"] = symbols
    return obs, var


def _check_counts(chunk: sp.csr_matrix, start: int, path: str | Path) -> None:
    data = chunk.data
    if not np.isfinite(data).all():
        raise InputError(
            path,
            "X",
            f"NaN or inf values in rows from {start}",
            "X must hold raw UMI counts; remove or fix those cells",
        )
    if (data < 0).any():
        raise InputError(
            path,
            "X",
            f"negative values in rows from {start}",
            "X must hold raw UMI counts, not normalised or scaled data",
        )
    if not np.array_equal(data, np.round(data)):
        raise InputError(
            path,
            "X",
            f"non-integer values in rows from {start}",
            "X must hold raw UMI counts; put raw counts in X (not log-normalised data)",
        )


def cell_totals(
    path: str | Path, chunk_size: int, targets: TargetExpression | None = None
) -> np.ndarray:
    """Total counts per cell, checking that X holds counts (and collecting ``targets``)."""
    totals = []
    for start, chunk in iter_row_chunks(path, chunk_size, desc="check counts"):
        _check_counts(chunk, start, path)
        totals.append(np.asarray(chunk.sum(axis=1), dtype=np.float64).ravel())
        if targets is not None:
            targets.add(start, chunk, totals[-1])
    return np.concatenate(totals)


def log_normalize(counts: sp.csr_matrix, totals: np.ndarray, target_sum: float) -> sp.csr_matrix:
    """log1p(counts / total * target_sum) per row; empty cells stay zero."""
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    out = sp.csr_matrix(counts, dtype=np.float64, copy=True)
    out.data *= np.repeat(scale, np.diff(out.indptr))
    out.data = np.log1p(out.data)
    return out.astype(np.float32)


def convert_to_gears(
    input_path: str | Path,
    output_path: str | Path,
    *,
    cell_type: str = "K562",
    control_label: str = "non-targeting",
    perturbation_column: str = "target_gene",
    exclude_labels: Sequence[str] = (),
    target_sum: float | None = None,
    chunk_size: int = 10_000,
    drop_missing_labels: bool = False,
    max_perturbation_residual: float | None = None,
    max_cell_residual: float | None = None,
    knockdown_min_cells: int = KnockdownFilter.min_cells,
    context_column: str | None = None,
) -> ConversionSummary:
    """Convert a VCC-format h5ad of raw counts into a GEARS-format h5ad (see module doc).

    Cells left out (no label with ``drop_missing_labels``, a label in ``exclude_labels``,
    no counts, a failed knockdown with the ``max_*_residual`` thresholds) are counted in
    the summary; the rows are selected chunk by chunk. With ``context_column``, each
    cell's context comes from that obs column instead of the constant ``cell_type``.
    """
    obs, var = read_annotations(input_path)
    input_obs = obs
    if context_column is None:
        _check_cell_type(cell_type)  # the config first, then the input
    else:
        _context_column(obs, context_column, input_path)
    labelled = labelled_cells(
        obs, perturbation_column, input_path, drop_missing_labels=drop_missing_labels
    )
    excluded = excluded_cells(obs, perturbation_column, exclude_labels, control_label, input_path)
    kept = labelled & ~excluded
    obs, var = gears_annotations(
        obs[kept],
        var,
        cell_type=cell_type,
        control_label=control_label,
        perturbation_column=perturbation_column,
        path=input_path,
        context_column=context_column,
    )  # the annotations are checked before X is read
    labels = _label_column(input_obs, perturbation_column, input_path).astype(str)
    column = {g: i for i, g in enumerate(var.index)}
    target_column = np.array([column.get(t, -1) for t in labels], dtype=np.int64)
    is_control = (labels == control_label).to_numpy()
    target_column[is_control] = -1
    targets = TargetExpression(target_column, is_control & kept)
    totals = cell_totals(input_path, chunk_size, targets)
    empty = totals == 0
    if empty[kept].any():
        log.warning("leaving out %d cells with no counts (nothing to normalise)", empty[kept].sum())
    residual = targets.residuals(~empty)
    guides = knockdown_table(input_obs, labels, residual, kept & ~empty)
    rule = KnockdownFilter(max_perturbation_residual, max_cell_residual, knockdown_min_cells)
    keep, knockdown_report = filter_knockdown(labels, residual, kept & ~empty, rule)
    obs = obs[keep[kept]].copy()
    for column in ("condition", CONTEXT):
        obs[column] = obs[column].cat.remove_unused_categories()
    median_total = float(np.median(totals[keep]))
    if target_sum is None:
        target_sum = median_total

    summary = ConversionSummary(
        n_cells=len(obs),
        n_genes=len(var),
        n_control_cells=int((obs["condition"] == CONTROL).sum()),
        n_perturbations=int(obs["condition"].nunique() - 1),
        target_sum=float(target_sum),
        median_total_counts=median_total,
        n_unlabelled_cells=int((~labelled).sum()),
        n_excluded_cells=int((labelled & excluded).sum()),
        n_empty_cells=int((labelled & ~excluded & empty).sum()),
        n_knockdown_filtered_cells=int((kept & ~empty & ~keep).sum()),
    )
    uns = {
        "scgpt_vcc": {
            **asdict(summary),
            "normalization": "log1p(counts / cell_total * target_sum)",
            "control_label": control_label,
            "perturbation_column": perturbation_column,
            "cell_type": cell_type,
            "context_column": context_column,
            "knockdown_filter": report_json(knockdown_report),
        },
        "scgpt_vcc_guides": guides,
    }
    with (
        atomic_path(output_path) as tmp,
        H5adStreamWriter(tmp, obs, var, uns, layers=("counts",)) as writer,
    ):
        for start, counts in iter_row_chunks(input_path, chunk_size, desc="log-normalise"):
            rows = keep[start : start + counts.shape[0]]
            chunk_totals = totals[start : start + len(rows)]
            if not rows.all():  # cells left out in this chunk: keep the others
                counts, chunk_totals = counts[rows], chunk_totals[rows]
            if counts.shape[0]:
                normalized = log_normalize(counts, chunk_totals, target_sum)
                writer.append(normalized, {"counts": counts.astype(np.float32)})
    log.info(
        "converted %d cells x %d genes (%d perturbations, %d control cells), target_sum %.1f",
        summary.n_cells,
        summary.n_genes,
        summary.n_perturbations,
        summary.n_control_cells,
        summary.target_sum,
    )
    return summary
