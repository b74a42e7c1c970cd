"""GEARS's differentially expressed genes, computed in one streaming pass.

GEARS (``gears/data_utils.py``: ``get_DE_genes``, ``get_dropout_non_zero_genes``) ranks
every gene of each condition against control with scanpy's ``rank_genes_groups``
(Welch t-test, all genes, ranked by absolute score) and derives the top-20 non-zero and
non-dropout gene sets; on the way it densifies X. A Welch t-test needs only the number
of cells, the mean and the variance per group, so here those come from per-group
sums, sums of squares and non-zero counts accumulated over CSR row chunks: memory is
one chunk plus five ``groups x genes`` tables, whatever the number of cells. The
fifth, sums of ``expm1(X)`` (the normalised counts), is not used by the t-test: it gives
the data QC the mean expression on the count scale (knockdown).

A group is a ``condition_name`` (context + condition): with several contexts
(``obs.cell_type``), each group is ranked against the control group of its own context,
as GEARS's ``rank_genes_groups_by_cov`` does per covariate, and its non-zero and
non-dropout sets use that control too (GEARS would use the control of all contexts).

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

from scgpt_vcc.data.gears import CONTEXT, CONTROL
from scgpt_vcc.errors import InputError
from scgpt_vcc.io import atomic_path, iter_row_chunks, open_h5ad, read_annotations

log = logging.getLogger(__name__)

N_TOP_DE = 20


@dataclass
class ConditionStats:
    """Sufficient statistics of X per group (rows follow ``groups``, condition names)."""

    groups: list[str]
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

    def row(self, group: str) -> int:
        return self.groups.index(group)


def dose_value(condition: str) -> str:
    return "1+1" if len(condition.split("+")) == 2 else "1"


def condition_name(context: str, condition: str) -> str:
    """GEARS's group key ``{cell_type}_{condition}_{dose}`` (as :func:`gears_obs` builds it)."""
    return f"{context}_{condition}_{dose_value(condition)}"


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
    out["condition_name"] = out[CONTEXT].astype(str) + "_" + condition + "_" + out["dose_val"]
    return out.astype("category")


def stat_groups(obs: pd.DataFrame) -> tuple[np.ndarray, pd.DataFrame]:
    """Each cell's stats row, and the rows: one per (context, condition) present.

    The rows (columns ``cell_type``, ``condition``, ``condition_name``) are sorted by
    context, then condition, so with one context they are the sorted conditions.
    """
    context = pd.Categorical(obs[CONTEXT].astype(str))
    condition = pd.Categorical(obs["condition"].astype(str))
    n_conditions = max(len(condition.categories), 1)
    pairs, codes = np.unique(
        context.codes.astype(np.int64) * n_conditions + condition.codes, return_inverse=True
    )
    rows = pd.DataFrame(
        {
            CONTEXT: np.asarray(context.categories[pairs // n_conditions], dtype=str),
            "condition": np.asarray(condition.categories[pairs % n_conditions], dtype=str),
        }
    )
    rows["condition_name"] = [
        condition_name(c, k) for c, k in zip(rows[CONTEXT], rows["condition"], strict=True)
    ]
    return codes.astype(np.int64).ravel(), rows


def control_rows(rows: pd.DataFrame) -> np.ndarray:
    """For each stats row, the row of its own context's control group."""
    controls = rows.index[rows["condition"] == CONTROL]
    by_context = dict(zip(rows.loc[controls, CONTEXT], controls, strict=True))
    return np.array([by_context[c] for c in rows[CONTEXT]], dtype=np.int64)


def accumulate_condition_stats(
    path: str | Path, codes: np.ndarray, groups: list[str], chunk_size: int
) -> ConditionStats:
    """One pass over X: per-group n, sum, sum of squares, non-zero counts and sum
    of ``expm1(X)``.

    ``codes[i]`` is the row of ``groups`` that cell ``i`` belongs to. Each chunk's
    non-zeros are binned by ``group * n_genes + gene`` with ``np.bincount``.
    """
    n_cond = len(groups)
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
        groups,
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


def rank_genes_vs_control(st: ConditionStats, reference: np.ndarray) -> dict[str, np.ndarray]:
    """Gene positions by decreasing |t| for each group against ``reference[group]``, the
    control group of its context; controls left out.

    Keys come in scanpy's group order (sorted categories), which is also the order an
    h5ad gives them back in.
    """
    mean, var = st.mean(), st.variance()
    ranked = {}
    for group in np.argsort(st.groups, kind="stable"):
        if group == reference[group]:
            continue
        scores = welch_scores(mean, var, st.n_cells, group, reference[group])
        ranked[st.groups[group]] = rank_by_abs_score(scores)
    return ranked


def dropout_non_zero_genes(
    st: ConditionStats,
    reference: np.ndarray,
    ranked: dict[str, np.ndarray],
    gene_names: np.ndarray,
) -> dict[str, dict[str, np.ndarray]]:
    """The four uns dicts of ``get_dropout_non_zero_genes``, with GEARS's types.

    A gene is non-zero for a group when its mean there is not 0; non-dropout when it
    is non-zero or zero in its context's control as well (a "true zero");
    ``reference[i]`` is the control row of stats row ``i``'s context.
    """
    row = {name: i for i, name in enumerate(st.groups)}
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
        non_zero = st.sums[row[name]] != 0
        non_dropout = non_zero | (st.sums[reference[row[name]]] == 0)
        out["non_zeros_gene_idx"][name] = np.flatnonzero(non_zero).astype(np.int64)
        out["non_dropout_gene_idx"][name] = np.flatnonzero(non_dropout).astype(np.int64)
        out["top_non_dropout_de_20"][name] = np.array(
            gene_names[top[non_dropout[top]][:N_TOP_DE]].tolist()
        )
        out["top_non_zero_de_20"][name] = np.array(
            gene_names[top[non_zero[top]][:N_TOP_DE]].tolist()
        )
    return out


def _check_groups(path: Path, rows: pd.DataFrame, st: ConditionStats) -> None:
    """Every context needs control cells (its reference) and every group two cells."""
    with_control = set(rows.loc[rows["condition"] == CONTROL, CONTEXT])
    no_control = [c for c in pd.unique(rows[CONTEXT]) if c not in with_control]
    if no_control:
        raise InputError(
            path,
            "obs.condition",
            f"has no 'ctrl' cells in the contexts (obs.{CONTEXT}) {no_control[:10]}",
            "check control_label in the config; each context's perturbations are ranked "
            "against its own control cells, so give every context some or leave it out",
        )
    single = [c for c, n in zip(st.groups, st.n_cells, strict=True) if n < 2]
    if single:
        raise InputError(
            path,
            "obs.condition",
            f"groups (context_condition_dose) with a single cell {single[:10]} "
            "(a t-test needs two)",
            "drop those cells before conversion",
        )


def compute_de(
    converted: str | Path, output: str | Path, stats_path: str | Path, chunk_size: int = 5000
) -> None:
    """Write ``perturb_processed.h5ad`` (GEARS's obs and uns additions) and the stats.

    X is copied chunk by chunk at the HDF5 level (no decompression); ``layers`` are not
    copied: GEARS reads only X, and the counts stay in ``converted.h5ad``.
    ``stats_path`` (.npz) keeps per group (context + condition; rows named by
    ``conditions``, ``contexts`` and ``condition_names``): cell counts (``n_cells``),
    means of X on the log1p scale (``mean``), means of ``expm1(X)``, the normalised counts
    (``mean_normalized_counts``), and non-zero fractions (``frac_nonzero``), for QC and
    baselines. With one context the rows are the sorted conditions.
    """
    converted = Path(converted)
    obs, var = read_annotations(converted)
    for column in ("condition", CONTEXT):
        if column not in obs:
            raise InputError(converted, f"obs.{column}", "is missing", "run convert-to-gears")
    new_obs = gears_obs(obs)
    codes, rows = stat_groups(obs)
    st = accumulate_condition_stats(converted, codes, rows["condition_name"].tolist(), chunk_size)
    _check_groups(converted, rows, st)
    reference = control_rows(rows)
    gene_names = np.asarray(var.index.astype(str), dtype=object)
    ranked = rank_genes_vs_control(st, reference)
    uns = {
        **_read_uns(converted),
        # object arrays of str: stored exactly like GEARS's lists (anndata string arrays)
        "rank_genes_groups_cov_all": {k: gene_names[v] for k, v in ranked.items()},
        **dropout_non_zero_genes(st, reference, ranked, gene_names),
    }
    _write_processed(converted, output, new_obs, var, uns)
    _write_stats(stats_path, st, rows, gene_names)
    log.info(
        "ranked %d genes for %d groups in %d contexts against their context's control",
        len(gene_names),
        len(ranked),
        rows[CONTEXT].nunique(),
    )


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


def _write_stats(
    path: str | Path, st: ConditionStats, rows: pd.DataFrame, genes: np.ndarray
) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(
            fh,
            conditions=rows["condition"].to_numpy(dtype=str),
            contexts=rows[CONTEXT].to_numpy(dtype=str),
            condition_names=rows["condition_name"].to_numpy(dtype=str),
            genes=genes.astype(str),
            n_cells=st.n_cells,
            mean=st.mean(),
            mean_normalized_counts=st.mean_normalized_counts(),
            frac_nonzero=(st.nonzero / st.n_cells[:, None]).astype(np.float32),
        )


def load_stats(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {key: f[key] for key in f.files}
