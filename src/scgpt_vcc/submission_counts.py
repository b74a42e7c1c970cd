"""The VCC 2026 form of a submission: raw integer counts, checked by cell-eval2's own validation.

A VCC 2026 submission holds raw counts (non-negative integers, no cell total above 10^6) on
the reference's gene axis, with its perturbation labels and the control label. It is made
from the VCC 2025 submission (``prediction.h5ad``: same cells, genes and labels, log1p of
counts normalised to the submission's ``target_sum``) by
:func:`scgpt_vcc.predict.counts.write_counts`: control cells are the training controls'
measured counts, predicted cells their expected counts at the depth of the control cell each
was made from, made integers by ``counts.sampling``.

cell-eval2 has no separate submission validator; its ``run`` validates a prediction with
``validate_input_type`` (counts: non-negative integers) and ``check_scale_limit`` (cell
totals) and, against a reference, ``validate_pair`` (gene axis, perturbation set, control).
:func:`check_counts_submission` calls those same functions, the pair check when the truth
is known (synthetic data).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np

from scgpt_vcc.errors import InputError
from scgpt_vcc.evaluate.run import EvalSettings
from scgpt_vcc.evaluate.score import SUBMISSION_UNS
from scgpt_vcc.io import read_uns, write_json_atomic
from scgpt_vcc.predict.counts import MAX_CELL_TOTAL, CountSettings, write_counts

log = logging.getLogger(__name__)

COUNTS_FILE = "prediction_counts.h5ad"
COUNTS_SUMMARY_FILE = "submission_counts.json"
PERTURBATION_COLUMN = EvalSettings.perturbation_column


def check_counts_submission(
    path: str | Path, control_label: str, truth: str | Path | None = None
) -> dict[str, Any]:
    """cell-eval2's checks of a counts submission (and of the pair, given the true counts)."""
    from cell_eval2.io import validate_pair
    from cell_eval2.norm import check_scale_limit, validate_input_type

    submission = ad.read_h5ad(path)
    checks = [
        lambda: validate_input_type(submission, "counts"),
        lambda: check_scale_limit(submission, "counts", MAX_CELL_TOTAL),
    ]
    if truth is not None:
        reference = ad.read_h5ad(truth, backed="r")
        checks.append(
            lambda: validate_pair(
                submission, reference, pert_col=PERTURBATION_COLUMN, control=control_label
            )
        )
    for check in checks:
        try:
            check()
        except ValueError as err:
            raise InputError(
                path, "X", f"fails cell-eval2's validation: {err}", "re-run submission_counts"
            ) from err
    labels = submission.obs[PERTURBATION_COLUMN].astype(str)
    if control_label not in set(labels):
        raise InputError(
            path,
            f"obs.{PERTURBATION_COLUMN}",
            f"has no '{control_label}' cells",
            "re-run submission",
        )
    totals = np.asarray(submission.X.sum(axis=1)).ravel()
    return {
        "n_cells": int(submission.n_obs),
        "n_genes": int(submission.n_vars),
        "n_perturbations": int(labels.nunique() - 1),
        "n_control_cells": int((labels == control_label).sum()),
        "max_cell_total": float(totals.max()),
        "median_cell_total": float(np.median(totals)),
        "validated_against_truth": truth is not None,
    }


def make_counts_submission(
    submission: str | Path,
    converted: str | Path,
    outdir: str | Path,
    control_label: str,
    settings: CountSettings | None = None,
    truth: str | Path | None = None,
) -> dict[str, Any]:
    """``prediction_counts.h5ad`` and ``submission_counts.json`` in ``outdir``."""
    outdir, settings = Path(outdir), settings or CountSettings()
    section = read_uns(submission).get(SUBMISSION_UNS, {})
    if "target_sum" not in section:
        raise InputError(
            submission, f"uns.{SUBMISSION_UNS}.target_sum", "is missing", "re-run submission"
        )
    output = outdir / COUNTS_FILE
    diagnostics = write_counts(
        submission, converted, output, settings, float(section["target_sum"])
    )
    summary = {
        **check_counts_submission(output, control_label, truth),
        **vars(diagnostics),
        "sampling": settings.sampling,
        "source": str(submission),
    }
    write_json_atomic(outdir / COUNTS_SUMMARY_FILE, summary)
    log.info("VCC 2026 submission %s: %s", output, summary)
    return summary
