"""The Virtual Cell Challenge metrics (DES, PDS, MAE) by cell-eval, within a memory budget.

``cell-eval``'s ``MetricsEvaluator`` loads both files and densifies them for its
pseudobulks (~27 GB at validation size). What each ``vcc`` metric needs (read from
cell-eval 0.8.2 and pdex 0.3.0):

- MAE (``mae``) and PDS (``discrimination_score_l1``) use only the mean expression of
  every perturbation and of the controls, in each file. We stream those means
  (:func:`~scgpt_vcc.evaluate.means.group_means`) and hand cell-eval an AnnData with one
  row per perturbation: the pseudobulk of one row is that row, so cell-eval's own MAE and
  PDS code runs on exactly the means it would have computed.
- DES (``overlap_at_N``) compares pdex's DE tables of real and predicted cells. pdex
  tests each perturbation against the control cells on its own and corrects FDR within
  that perturbation; the overlap of a perturbation uses only its own rows. So cell-eval
  runs on groups of perturbations, each with all control cells, and the per-perturbation
  values are identical to one run on everything.

``tests/test_evaluate_vcc.py`` checks the three against one plain cell-eval run
(``tests/references.py``).
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from scgpt_vcc.errors import InputError
from scgpt_vcc.evaluate.means import GroupMeans, read_labels
from scgpt_vcc.io import CsrRowReader

log = logging.getLogger(__name__)

VCC_METRICS = ("des", "pds", "mae")
# cell-eval's metric names in the "vcc" profile.
CELL_EVAL_NAMES = {"overlap_at_N": "des", "discrimination_score_l1": "pds", "mae": "mae"}
HIGHER_IS_BETTER = {"des": True, "pds": True, "mae": False}


def cell_eval_version() -> str:
    return importlib.metadata.version("cell-eval")


def cell_eval_evaluator(real: ad.AnnData, pred: ad.AnnData, control: str, column: str, **kwargs):
    from cell_eval import MetricsEvaluator

    return MetricsEvaluator(
        adata_pred=pred, adata_real=real, control_pert=control, pert_col=column, **kwargs
    )


def per_perturbation_table(results) -> pd.DataFrame:
    """cell-eval's per-perturbation polars table -> pandas with our metric names."""
    frame = results.to_pandas().set_index("perturbation").rename(columns=CELL_EVAL_NAMES)
    frame = frame[[c for c in VCC_METRICS if c in frame.columns]]
    frame.index = frame.index.astype(str)
    frame.index.name = "perturbation"
    return frame


def _means_adata(means: GroupMeans, column: str) -> ad.AnnData:
    obs = pd.DataFrame({column: pd.Categorical(means.labels)}, index=means.labels)
    return ad.AnnData(X=means.means, obs=obs, var=pd.DataFrame(index=means.genes))


def mae_pds(
    real: GroupMeans, pred: GroupMeans, control: str, column: str = "target_gene"
) -> pd.DataFrame:
    """cell-eval's MAE and PDS of every perturbation, computed from the streamed means."""
    with tempfile.TemporaryDirectory() as tmp:
        evaluator = cell_eval_evaluator(
            _means_adata(real, column),
            _means_adata(pred, column),
            control,
            column,
            skip_de=True,
            outdir=tmp,
            num_threads=1,
        )
        results, _ = evaluator.compute(
            profile="vcc", skip_metrics=["overlap_at_N"], write_csv=False, break_on_error=True
        )
    return per_perturbation_table(results)


def _subset(path: Path, labels: np.ndarray, genes: np.ndarray, keep: set[str], column: str):
    rows = np.flatnonzero(np.isin(labels, list(keep)))
    obs = pd.DataFrame({column: pd.Categorical(labels[rows])}, index=rows.astype(str))
    reader = CsrRowReader(path)
    try:
        matrix = reader.read_csr(rows)
    finally:
        reader.close()
    return ad.AnnData(X=matrix, obs=obs, var=pd.DataFrame(index=genes))


def perturbation_groups(perturbations: list[str], group_size: int) -> Iterator[list[str]]:
    for start in range(0, len(perturbations), group_size):
        yield perturbations[start : start + group_size]


def des_by_groups(
    real_path: str | Path,
    pred_path: str | Path,
    control: str,
    column: str = "target_gene",
    group_size: int = 10,
    threads: int = 1,
) -> pd.DataFrame:
    """cell-eval's DES of every perturbation, run on groups of perturbations + all controls."""
    real_labels, genes = read_labels(real_path, column)
    pred_labels, _ = read_labels(pred_path, column)
    perturbations = sorted(set(real_labels) - {control})
    frames = []
    for number, group in enumerate(perturbation_groups(perturbations, group_size), 1):
        log.info("DES group %d: %d perturbations", number, len(group))
        keep = {*group, control}
        real = _subset(Path(real_path), real_labels, genes, keep, column)
        pred = _subset(Path(pred_path), pred_labels, genes, keep, column)
        with tempfile.TemporaryDirectory() as tmp:
            evaluator = cell_eval_evaluator(
                real, pred, control, column, outdir=tmp, num_threads=threads
            )
            results, _ = evaluator.compute(
                profile="vcc",
                skip_metrics=["mae", "discrimination_score_l1"],
                write_csv=False,
                break_on_error=True,
            )
        frames.append(per_perturbation_table(results))
        del real, pred, evaluator
    return pd.concat(frames)


def check_pair(real_path: Path, pred_path: Path, real: GroupMeans, pred: GroupMeans, control: str):
    """Same genes in the same order and the same perturbations, control included."""
    if not np.array_equal(real.genes, pred.genes):
        raise InputError(
            pred_path,
            "var_names",
            f"differ from {real_path}'s",
            "predict the real file's genes in its order",
        )
    if control not in real.labels:
        raise InputError(real_path, "obs", f"has no '{control}' control cells", "add the controls")
    if control not in pred.labels:
        raise InputError(
            pred_path,
            "obs",
            f"has no '{control}' control cells",
            "add the control cells on the same scale",
        )
    if not np.array_equal(real.labels, pred.labels):
        missing = sorted(set(real.labels) ^ set(pred.labels))
        raise InputError(
            pred_path,
            "obs perturbations",
            f"differ from the real file's: {missing[:5]}",
            "predict every held-out perturbation",
        )


def vcc_metrics(
    real_path: str | Path,
    pred_path: str | Path,
    real: GroupMeans,
    pred: GroupMeans,
    control: str,
    column: str = "target_gene",
    group_size: int = 10,
    threads: int = 1,
) -> pd.DataFrame:
    """DES, PDS and MAE per perturbation, equal to one cell-eval ``vcc`` run on both files."""
    check_pair(Path(real_path), Path(pred_path), real, pred, control)
    des = des_by_groups(real_path, pred_path, control, column, group_size, threads)
    return des.join(mae_pds(real, pred, control, column), how="outer")[list(VCC_METRICS)]


def challenge_score(model: Mapping[str, float], baseline: Mapping[str, float]) -> dict[str, float]:
    """The VCC overall score of ``model`` against the cell-mean ``baseline`` (0-100).

    DES and PDS: ``(x - base) / (1 - base)``; MAE: ``1 - x / base``; each NaN -> 0 and
    clipped at 0 (cell-eval's ``score_agg_metrics``); mean of the three, times 100.
    """
    parts = {}
    for name in VCC_METRICS:
        x, base = np.float64(model[name]), np.float64(baseline[name])
        with np.errstate(divide="ignore", invalid="ignore"):  # a baseline at the best value
            value = (x - base) / (1 - base) if HIGHER_IS_BETTER[name] else 1 - x / base
        parts[f"{name}_score"] = 0.0 if math.isnan(value) else max(float(value), 0.0)
    parts["challenge_score"] = 100 * float(np.mean(list(parts.values())))
    return parts
