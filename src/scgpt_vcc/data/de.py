"""GEARS's differentially expressed genes, computed in one streaming pass.

GEARS (``gears/data_utils.py``: ``get_DE_genes``, ``get_dropout_non_zero_genes``) ranks
every gene of each condition against control with scanpy's ``rank_genes_groups``
(Welch t-test, all genes, ranked by absolute score) and derives the top-20 non-zero and
non-dropout gene sets; on the way it densifies X. A Welch t-test needs only the number
of cells, the mean and the variance per group, so here those come from per-condition
sums, sums of squares and non-zero counts accumulated over CSR row chunks: memory is
one chunk plus five ``conditions x genes`` tables, whatever the number of cells. The
fifth, sums of ``expm1(X)`` (the normalised counts), is not used by the t-test: it gives
the data QC the mean expression on the count scale (knockdown).

The arithmetic follows scanpy's (``_get_mean_var``): float32 values, squares taken in
float32, sums in float64, ``var = E[x^2] - E[x]^2`` scaled by ``n / (n - 1)``, NaN
scores set to 0; the ranking uses the same partition + sort calls, so ties fall the
same way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from anndata.io import read_elem, write_elem

from scgpt_vcc.data.gears import CONTROL
from scgpt_vcc.errors import InputError
from scgpt_vcc.io import atomic_path, iter_row_chunks, open_h5ad, read_annotations

log = logging.getLogger(__name__)

N_TOP_DE = 20


@dataclass
class ConditionStats:
    """Sufficient statistics of X per condition (rows follow ``conditions``)."""

    conditions: list[str]
    n_cells: np.ndarray  # int64 [C]
    sums: np.ndarray  # float64 [C, G]
    sq_sums: np.ndarray  # float64 [C, G]
    nonzero: np.ndarray  # int64 [C, G]
    count_sums: np.ndarray  # float64 [C, G], sums of expm1(X): normalised counts

    def mean(self) -> np.ndarray:
        return self.sums / self.n_cells[:, None]

    def mean_normalized_counts(self) -> np.ndarray:
        return self.count_sums / self.n_cells[:, None]

    def variance(self) -> np.ndarray:
        """Unbiased variance, computed as scanpy does (see the module docstring)."""
        n = self.n_cells[:, None].astype(np.float64)
        var = self.sq_sums / n - (self.sums / n) ** 2
        return np.where(n != 1, var * n / np.maximum(n - 1, 1), var)

    def row(self, condition: str) -> int:
        return self.conditions.index(condition)


def dose_value(condition: str) -> str:
    return "1+1" if len(condition.split("+")) == 2 else "1"


def gears_obs(obs: pd.DataFrame) -> pd.DataFrame:
    """Add GEARS's ``dose_val``, ``control`` and ``condition_name`` to ``obs``.

    Same values and types as ``get_DE_genes``, quirks included: a condition with a '+'
    ('A+ctrl' as well as 'A+B') gets dose '1+1' and control 0, 'ctrl' gets '1' and 1,
    so names read 'K562_A+ctrl_1+1' and 'K562_ctrl_1'; every obs column ends up
    categorical.
    """
    out = obs.copy()
    condition = out["condition"].astype(str)
    out["dose_val"] = condition.map(dose_value)
    out["control"] = condition.map(lambda c: 0 if len(c.split("+")) == 2 else 1)
    out["condition_name"] = out["cell_type"].astype(str) + "_" + condition + "_" + out["dose_val"]
    return out.astype("category")


def accumulate_condition_stats(
    path: str | Path, codes: np.ndarray, conditions: list[str], chunk_size: int
) -> ConditionStats:
    """One pass over X: per-condition n, sum, sum of squares, non-zero counts and sum
    of ``expm1(X)``.

    ``codes[i]`` is the row of ``conditions`` that cell ``i`` belongs to. Each chunk's
    non-zeros are binned by ``condition * n_genes + gene`` with ``np.bincount``.
    """
    n_cond = len(conditions)
    n_cells = np.bincount(codes, minlength=n_cond).astype(np.int64)
    sums = sq_sums = nonzero = count_sums = None
    for start, chunk in iter_row_chunks(path, chunk_size, desc="DE statistics"):
        n_genes = chunk.shape[1]
        if sums is None:
            sums = np.zeros(n_cond * n_genes)
            sq_sums = np.zeros(n_cond * n_genes)
            nonzero = np.zeros(n_cond * n_genes, dtype=np.int64)
            count_sums = np.zeros(n_cond * n_genes)
        chunk.eliminate_zeros()
        data = chunk.data.astype(np.float32, copy=False)
        rows = np.repeat(codes[start : start + chunk.shape[0]], np.diff(chunk.indptr))
        bins = rows.astype(np.int64) * n_genes + chunk.indices
        del rows
        size = n_cond * n_genes
        sums += np.bincount(bins, weights=data, minlength=size)
        sq_sums += np.bincount(bins, weights=data * data, minlength=size)
        nonzero += np.bincount(bins, minlength=size)
        counts = np.expm1(data, dtype=np.float64)
        count_sums += np.bincount(bins, weights=counts, minlength=size)
    if sums is None:
        raise InputError(path, "X", "has no cells", "re-run convert-to-gears on a non-empty input")
    shape = (n_cond, -1)
    return ConditionStats(
        conditions,
        n_cells,
        sums.reshape(shape),
        sq_sums.reshape(shape),
        nonzero.reshape(shape),
        count_sums.reshape(shape),
    )


def rank_by_abs_score(scores: np.ndarray) -> np.ndarray:
    """Gene order by decreasing |score|, with scanpy's partition + sort (same ties)."""
    magnitude = np.abs(scores)
    n = magnitude.shape[0]
    partition = np.argpartition(magnitude, -n)[-n:]
    return partition[np.argsort(magnitude[partition])[::-1]]


def welch_scores(
    mean: np.ndarray, var: np.ndarray, n_cells: np.ndarray, group: int, reference: int
) -> np.ndarray:
    """Welch t statistics of one group against the reference, NaN set to 0.

    The operations are those of scipy's ``ttest_ind_from_stats(..., equal_var=False)``
    as scanpy calls it (standard deviations in, squared again), without the p-values.
    """
    v1 = np.sqrt(var[group]) ** 2
    v2 = np.sqrt(var[reference]) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        denom = np.sqrt(v1 / n_cells[group] + v2 / n_cells[reference])
        scores = np.divide(mean[group] - mean[reference], denom)
    scores[np.isnan(scores)] = 0
    return scores


def rank_genes_vs_control(
    st: ConditionStats, names: list[str], control_name: str
) -> dict[str, np.ndarray]:
    """Gene positions by decreasing |t| for each ``condition_name``, control left out.

    ``names[i]`` is the ``condition_name`` of stats row ``i``; keys come in scanpy's
    group order (sorted categories).
    """
    reference = names.index(control_name)
    mean, var = st.mean(), st.variance()
    ranked = {}
    for group in np.argsort(names, kind="stable"):
        if group == reference:
            continue
        scores = welch_scores(mean, var, st.n_cells, group, reference)
        ranked[names[group]] = rank_by_abs_score(scores)
    return ranked


def dropout_non_zero_genes(
    st: ConditionStats, names: list[str], ranked: dict[str, np.ndarray], gene_names: np.ndarray
) -> dict[str, dict[str, np.ndarray]]:
    """The four uns dicts of ``get_dropout_non_zero_genes``, with GEARS's types.

    A gene is non-zero for a condition when its mean there is not 0; non-dropout when
    it is non-zero or zero in control as well (a "true zero").
    """
    ctrl_zero = st.sums[st.row(CONTROL)] == 0
    out: dict[str, dict[str, np.ndarray]] = {
        key: {}
        for key in (
            "top_non_dropout_de_20",
            "non_dropout_gene_idx",
            "non_zeros_gene_idx",
            "top_non_zero_de_20",
        )
    }
    for name, top in ranked.items():
        sums = st.sums[names.index(name)]
        non_zero = sums != 0
        non_dropout = non_zero | ctrl_zero
        out["non_zeros_gene_idx"][name] = np.flatnonzero(non_zero).astype(np.int64)
        out["non_dropout_gene_idx"][name] = np.flatnonzero(non_dropout).astype(np.int64)
        out["top_non_dropout_de_20"][name] = np.array(
            gene_names[top[non_dropout[top]][:N_TOP_DE]].tolist()
        )
        out["top_non_zero_de_20"][name] = np.array(
            gene_names[top[non_zero[top]][:N_TOP_DE]].tolist()
        )
    return out


def _check_groups(path: Path, obs: pd.DataFrame, st: ConditionStats) -> None:
    cell_types = obs["cell_type"].astype(str).unique()
    if len(cell_types) != 1:
        raise InputError(
            path,
            "obs.cell_type",
            f"has {len(cell_types)} values {list(cell_types)[:5]}",
            "process one cell type per dataset",
        )
    if CONTROL not in st.conditions:
        raise InputError(
            path, "obs.condition", "has no 'ctrl' cells", "check control_label in the config"
        )
    single = [c for c, n in zip(st.conditions, st.n_cells, strict=True) if n < 2]
    if single:
        raise InputError(
            path,
            "obs.condition",
            f"conditions with a single cell {single[:10]} (a t-test needs two)",
            "drop those cells before conversion",
        )


def compute_de(
    converted: str | Path, output: str | Path, stats_path: str | Path, chunk_size: int = 5000
) -> None:
    """Write ``perturb_processed.h5ad`` (GEARS's obs and uns additions) and the stats.

    X is copied chunk by chunk at the HDF5 level (no decompression); ``layers`` are not
    copied: GEARS reads only X, and the counts stay in ``converted.h5ad``.
    ``stats_path`` (.npz) keeps per condition: cell counts (``n_cells``), means of X on
    the log1p scale (``mean``), means of ``expm1(X)``, the normalised counts
    (``mean_normalized_counts``), and non-zero fractions (``frac_nonzero``), for QC and
    baselines.
    """
    converted = Path(converted)
    obs, var = read_annotations(converted)
    for column in ("condition", "cell_type"):
        if column not in obs:
            raise InputError(converted, f"obs.{column}", "is missing", "run convert-to-gears")
    new_obs = gears_obs(obs)
    condition = pd.Categorical(obs["condition"].astype(str))
    conditions = list(condition.categories)
    st = accumulate_condition_stats(
        converted, condition.codes.astype(np.int64), conditions, chunk_size
    )
    _check_groups(converted, obs, st)
    first_name = new_obs.groupby("condition", observed=True)["condition_name"].first()
    names = [str(first_name[c]) for c in conditions]
    gene_names = np.asarray(var.index.astype(str), dtype=object)
    ranked = rank_genes_vs_control(st, names, names[st.row(CONTROL)])
    uns = {
        **_read_uns(converted),
        # object arrays of str: stored exactly like GEARS's lists (anndata string arrays)
        "rank_genes_groups_cov_all": {k: gene_names[v] for k, v in ranked.items()},
        **dropout_non_zero_genes(st, names, ranked, gene_names),
    }
    _write_processed(converted, output, new_obs, var, uns)
    _write_stats(stats_path, st, names, gene_names)
    log.info("ranked %d genes for %d conditions against control", len(gene_names), len(ranked))


def _read_uns(path: Path) -> dict:
    with open_h5ad(path) as f:
        return dict(read_elem(f["uns"])) if "uns" in f else {}


def _write_processed(
    source: Path, output: str | Path, obs: pd.DataFrame, var: pd.DataFrame, uns: dict
) -> None:
    with atomic_path(output) as tmp, h5py.File(source, "r") as src, h5py.File(tmp, "w") as dst:
        dst.attrs["encoding-type"] = "anndata"
        dst.attrs["encoding-version"] = "0.1.0"
        src.copy(src["X"], dst, "X")
        write_elem(dst, "obs", obs)
        write_elem(dst, "var", var)
        write_elem(dst, "uns", uns)
        for group in ("layers", "obsm", "varm", "obsp", "varp"):
            write_elem(dst, group, {})


def _write_stats(path: str | Path, st: ConditionStats, names: list[str], genes: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(
            fh,
            conditions=np.array(st.conditions),
            condition_names=np.array(names),
            genes=genes.astype(str),
            n_cells=st.n_cells,
            mean=st.mean(),
            mean_normalized_counts=st.mean_normalized_counts(),
            frac_nonzero=(st.nonzero / st.n_cells[:, None]).astype(np.float32),
        )


def load_stats(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {key: f[key] for key in f.files}
