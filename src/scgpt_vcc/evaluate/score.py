"""Score a VCC submission against the true held-out cells, as the challenge does.

Inputs are workflow outputs: the submission ``prediction.h5ad`` of the model, the same
kind of file made by the cell-mean baseline (``train_mean``, fitted on the same training
perturbations and submitted the same way) and the truth converted by ``convert-to-gears``
with ``target_sum`` left to the truth's own median total count: cell-eval normalises the
real counts it scores in that way before log1p. DES, PDS and MAE come from
:func:`~scgpt_vcc.evaluate.vcc.vcc_metrics` (cell-eval); the challenge score is the
model's against the baseline's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import anndata as ad

from scgpt_vcc.evaluate.means import group_means
from scgpt_vcc.evaluate.vcc import VCC_METRICS, challenge_score, vcc_metrics
from scgpt_vcc.io import write_json_atomic

log = logging.getLogger(__name__)

# obs column of the perturbation in a VCC submission (and in the challenge's files).
SUBMISSION_COLUMN = "target_gene"
# uns entry where the submission records its settings (scgpt_vcc.submission).
SUBMISSION_UNS = "scgpt_vcc_submission"


def submission_model_type(path: str | Path) -> str:
    """The model type a submission file records in ``uns`` (``unknown`` when absent)."""
    adata = ad.read_h5ad(path, backed="r")
    try:
        return str(adata.uns.get(SUBMISSION_UNS, {}).get("model_type", "unknown"))
    finally:
        adata.file.close()


def score_submission(
    submission: str | Path,
    baseline: str | Path,
    truth: str | Path,
    output: str | Path,
    control_label: str,
    threads: int = 1,
) -> dict[str, Any]:
    """DES, PDS, MAE and challenge score of ``submission``; written to ``output`` (JSON)."""
    real_means = group_means(truth, SUBMISSION_COLUMN)
    tables = {
        name: vcc_metrics(
            truth,
            path,
            real_means,
            group_means(path, SUBMISSION_COLUMN),
            control_label,
            column=SUBMISSION_COLUMN,
            threads=threads,
        )
        for name, path in (("model", Path(submission)), ("baseline", Path(baseline)))
    }
    model = {k: float(tables["model"][k].mean()) for k in VCC_METRICS}
    base = {k: float(tables["baseline"][k].mean()) for k in VCC_METRICS}
    result = {
        "model_type": submission_model_type(submission),
        **model,
        **challenge_score(model, base),
        "baseline": base,
        "baseline_model_type": submission_model_type(baseline),
        "per_perturbation": tables["model"].to_dict(orient="index"),
    }
    write_json_atomic(output, result)
    log.info(
        "submission score: %s", {k: round(result[k], 4) for k in (*VCC_METRICS, "challenge_score")}
    )
    return result
