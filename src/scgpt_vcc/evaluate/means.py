"""Per-perturbation mean expression of an h5ad file, in one streaming pass.

Every metric of this package (the GEARS/scGPT Pearson family and cell-eval's MAE and
PDS) needs only the mean expression of each perturbation and of the controls. Those are
sums over rows, so they are accumulated over CSR row chunks in float64 and the file is
never densified. The same pass records what cell-eval checks about the scale of ``X``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from scgpt_vcc.errors import InputError
from scgpt_vcc.io import iter_row_chunks, read_annotations

# cell-eval's guess_is_lognorm: a value with a fractional part above this is "decimal",
# and log1p data must lie in [0, LOG1P_MAX).
FRACTION_EPSILON = 1e-3
LOG1P_MAX = 15.0


@dataclass(frozen=True)
class GroupMeans:
    """Mean expression per perturbation label (rows sorted by label)."""

    labels: np.ndarray  # str, sorted, includes the control label
    n_cells: np.ndarray  # int64, cells per label
    means: np.ndarray  # float64, labels x genes
    genes: np.ndarray  # str, the file's var index
    has_decimals: bool  # any value with a fractional part (cell-eval: log1p, not counts)
    min_value: float
    max_value: float

    def row(self, label: str) -> np.ndarray:
        return self.means[self.index(label)]

    def index(self, label: str) -> int:
        pos = np.searchsorted(self.labels, label)
        if pos == len(self.labels) or self.labels[pos] != label:
            raise KeyError(label)
        return int(pos)


def read_labels(path: str | Path, column: str) -> tuple[np.ndarray, np.ndarray]:
    """``obs[column]`` of an h5ad file as strings, and its var index."""
    obs, var = read_annotations(path)
    if column not in obs:
        raise InputError(
            path, f"obs.{column}", "is missing", "write predictions with the perturbation column"
        )
    return obs[column].astype(str).to_numpy(), var.index.astype(str).to_numpy()


def group_means(path: str | Path, column: str, chunk_size: int = 10000) -> GroupMeans:
    """Stream ``X`` of ``path`` once; return the mean row of every ``obs[column]`` value."""
    labels, genes = read_labels(path, column)
    names, codes = np.unique(labels, return_inverse=True)
    sums = np.zeros((len(names), len(genes)), dtype=np.float64)
    has_decimals, lo, hi = False, np.inf, -np.inf
    for start, chunk in iter_row_chunks(path, chunk_size, desc=f"means {Path(path).name}"):
        rows = codes[start : start + chunk.shape[0]]
        indicator = sp.csr_matrix(
            (np.ones(len(rows)), (rows, np.arange(len(rows)))), shape=(len(names), len(rows))
        )
        sums += (indicator @ chunk.astype(np.float64)).toarray()
        has_decimals, lo, hi = _scale(chunk, has_decimals, lo, hi)
    n_cells = np.bincount(codes, minlength=len(names)).astype(np.int64)
    return GroupMeans(
        labels=names,
        n_cells=n_cells,
        means=sums / np.maximum(n_cells, 1)[:, None],
        genes=genes,
        has_decimals=has_decimals,
        min_value=float(lo),
        max_value=float(hi),
    )


def _scale(chunk: sp.csr_matrix, has_decimals: bool, lo: float, hi: float) -> tuple:
    """Update cell-eval's scale facts (any decimals, min, max) with one chunk."""
    data = chunk.data
    if data.size == 0:
        return has_decimals, min(lo, 0.0), max(hi, 0.0)
    frac = np.modf(data)[0]
    has_decimals = has_decimals or bool(np.any(frac > FRACTION_EPSILON))
    # Implicit zeros count too when a chunk is not fully stored.
    zeros = data.size < chunk.shape[0] * chunk.shape[1]
    lo = min(lo, float(data.min()), 0.0 if zeros else np.inf)
    hi = max(hi, float(data.max()), 0.0 if zeros else -np.inf)
    return has_decimals, lo, hi


def check_log1p(path: str | Path, means: GroupMeans) -> None:
    """Refuse files that cell-eval would renormalise or reject (see docs/metrics.md).

    cell-eval treats all-integer ``X`` as counts and normalises each cell to the file's
    median depth before log1p; predictions must already be log1p on the real data's scale.
    """
    if not means.has_decimals:
        raise InputError(
            path,
            "X",
            "holds only integers (raw counts?)",
            "write log1p-normalised expression on the real data's scale",
        )
    if means.min_value < 0 or means.max_value >= LOG1P_MAX:
        raise InputError(
            path,
            "X",
            f"ranges over [{means.min_value:.3g}, {means.max_value:.3g}], outside log1p's [0, 15)",
            "write log1p-normalised expression (never CP10k against counts, never negative)",
        )
