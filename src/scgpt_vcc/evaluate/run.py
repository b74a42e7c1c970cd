"""Evaluate one model type's predictions: per-perturbation table, metrics.json, means.

Outputs in ``outdir`` (``results/eval/{dataset}/seed{seed}/{model_type}/``):

- ``per_perturbation.csv``: one row per held-out perturbation with cell counts, the
  GEARS/scGPT metrics and cell-eval's DES, PDS and MAE;
- ``metrics.json``: the mean of every column over perturbations, the challenge score
  against the baseline, the baseline's source and the cell-eval version;
- ``means.npz``: real, predicted and control mean expression per perturbation (for the
  predicted-vs-true change plots of ``summarize``).

With several cell contexts every number is computed per context (:mod:`.contexts`):
``per_perturbation.csv`` gains a ``context`` column, ``means.npz`` names perturbations
``{context}:{target}`` with each one's own context's control mean, and ``metrics.json``
holds the mean over contexts with each context's own summary under ``contexts``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scgpt_vcc.data.gears import CONTEXT
from scgpt_vcc.errors import InputError
from scgpt_vcc.evaluate.ceiling import calibrated_scores, json_number, json_numbers, read_ceiling
from scgpt_vcc.evaluate.contexts import context_files, mean_over_contexts, several_contexts
from scgpt_vcc.evaluate.means import check_log1p, group_means
from scgpt_vcc.evaluate.metrics import GEARS_METRICS, gears_metrics, read_de_genes
from scgpt_vcc.evaluate.vcc import (
    VCC_METRICS,
    cell_eval_version,
    challenge_score,
    check_pair,
    vcc_metrics,
)
from scgpt_vcc.io import atomic_path, write_json_atomic

log = logging.getLogger(__name__)

ALL_METRICS = (*GEARS_METRICS, *VCC_METRICS)
# The metric suites (config evaluate.profiles): vcc2025 = this module, always run;
# vcc2026 = cell-eval2 on raw counts (evaluate/vcc2026.py).
PROFILES = ("vcc2025", "vcc2026")
BASELINE_MODEL = "train_mean"
# The VCC validation-phase cell-mean baseline as published by the challenge; only
# meaningful for the real validation set (docs/metrics.md).
DEFAULT_BASELINE = {"des": 0.106, "pds": 0.515, "mae": 0.027}


@dataclass(frozen=True)
class EvalSettings:
    control_label: str = "non-targeting"
    perturbation_column: str = "target_gene"
    de_key: str = "rank_genes_groups_cov_all"
    n_top_de: int = 20
    chunk_size: int = 10000
    vcc_group_size: int = 10
    threads: int = 2
    # The generator seed of the ceiling's half split (cell-eval's compute_ceiling default).
    ceiling_seed: int = 0


def read_baseline(
    model_type: str,
    baseline_metrics: Path | None,
    fallback: dict[str, float],
    context: str | None = None,
) -> tuple[dict[str, float] | None, str]:
    """Baseline of the challenge score: train_mean's metrics.json when given (its
    ``context``'s numbers with several contexts), else ``fallback``.

    The baseline model itself is scored against its own numbers (0 by construction).
    """
    if model_type == BASELINE_MODEL:
        return None, "self"
    if baseline_metrics is not None:
        data = json.loads(Path(baseline_metrics).read_text())
        if context is not None:
            data = data.get("contexts", {}).get(context, {})
        missing = [k for k in VCC_METRICS if k not in data]
        if missing:
            raise InputError(
                baseline_metrics, str(missing), "is missing", "re-run evaluate for train_mean"
            )
        return {k: data[k] for k in VCC_METRICS}, str(baseline_metrics)
    return dict(fallback), "config evaluate.challenge_baseline"


@dataclass
class Evaluation:
    """What one evaluation writes: per-perturbation table, summary and the means' arrays."""

    table: pd.DataFrame
    summary: dict[str, Any]
    means: dict[str, np.ndarray] = field(default_factory=dict)


def evaluate_predictions(
    real_path: str | Path,
    pred_path: str | Path,
    processed_path: str | Path,
    outdir: str | Path,
    model_type: str,
    settings: EvalSettings = EvalSettings(),
    baseline_metrics: Path | None = None,
    fallback_baseline: dict[str, float] | None = None,
    ceiling_path: Path | None = None,
) -> dict[str, Any]:
    """Compute every metric of ``pred_path`` against ``real_path``; write them to ``outdir``.

    With ``ceiling_path`` (``ceiling_vcc2025.json`` of the same real file), the ceiling and
    the calibrated scores against the challenge score's baseline are added. Several cell
    contexts are scored one by one and averaged (module docstring).
    """
    args = (processed_path, model_type, settings, baseline_metrics, fallback_baseline)
    contexts = several_contexts(real_path)
    if not contexts:
        result = _evaluate(real_path, pred_path, *args, ceiling_path)
    else:
        paths = {"real": real_path, "pred": pred_path}
        with context_files(paths, contexts, settings.chunk_size) as files:
            result = _combine(
                {
                    c: _evaluate(files[c]["real"], files[c]["pred"], *args, ceiling_path, c)
                    for c in contexts
                }
            )
    _write_outputs(Path(outdir), result)
    log.info("%s: %s", model_type, {k: round(result.summary[k], 4) for k in ALL_METRICS})
    return result.summary


def _evaluate(
    real_path: str | Path,
    pred_path: str | Path,
    processed_path: str | Path,
    model_type: str,
    settings: EvalSettings,
    baseline_metrics: Path | None,
    fallback_baseline: dict[str, float] | None,
    ceiling_path: Path | None,
    context: str | None = None,
) -> Evaluation:
    """Every metric of one context (``None``: the file's only one)."""
    s = settings
    real = group_means(real_path, s.perturbation_column, s.chunk_size)
    pred = group_means(pred_path, s.perturbation_column, s.chunk_size)
    check_log1p(real_path, real)
    check_log1p(pred_path, pred)
    check_pair(Path(real_path), Path(pred_path), real, pred, s.control_label)
    perturbations = [p for p in real.labels if p != s.control_label]
    if not perturbations:
        raise InputError(real_path, "obs", "has only control cells", "add held-out perturbations")
    de_genes = read_de_genes(processed_path, perturbations, s.de_key, s.n_top_de, context)
    table = gears_metrics(real, pred, s.control_label, de_genes, perturbations)
    table = table.join(
        vcc_metrics(
            real_path,
            pred_path,
            real,
            pred,
            s.control_label,
            s.perturbation_column,
            s.vcc_group_size,
            s.threads,
        )
    )
    counts = pd.DataFrame(
        {
            "n_cells_real": [int(real.n_cells[real.index(p)]) for p in perturbations],
            "n_cells_pred": [int(pred.n_cells[pred.index(p)]) for p in perturbations],
        },
        index=pd.Index(perturbations, name="perturbation"),
    )
    table = counts.join(table)[["n_cells_real", "n_cells_pred", *ALL_METRICS]]
    summary = {name: float(table[name].mean()) for name in ALL_METRICS}
    baseline, source = read_baseline(
        model_type, baseline_metrics, fallback_baseline or DEFAULT_BASELINE, context
    )
    summary.update(challenge_score(summary, baseline or summary))
    summary.update(
        model_type=model_type,
        n_perturbations=len(perturbations),
        baseline=baseline or {k: summary[k] for k in VCC_METRICS},
        baseline_source=source,
        cell_eval_version=cell_eval_version(),
        de_key=s.de_key,
        control_label=s.control_label,
    )
    if ceiling_path is not None:
        ceiling = read_ceiling(ceiling_path, s.control_label, perturbations, context)
        summary.update(_calibration(summary, ceiling))
    position = {g: i for i, g in enumerate(real.genes)}
    de_idx = np.full((len(perturbations), s.n_top_de), -1, dtype=np.int64)  # -1 pads
    for row, p in enumerate(perturbations):
        de_idx[row, : len(de_genes[p])] = [position[g] for g in de_genes[p]]
    means = {
        "perturbations": np.array(perturbations),
        "genes": real.genes,
        "real": np.stack([real.row(p) for p in perturbations]).astype(np.float32),
        "pred": np.stack([pred.row(p) for p in perturbations]).astype(np.float32),
        "control": real.row(s.control_label).astype(np.float32),
        "de_idx": de_idx,
    }
    return Evaluation(table, summary, means)


def _combine(parts: dict[str, Evaluation]) -> Evaluation:
    """One evaluation of several contexts: tables stacked with a ``context`` column, the
    summary averaged over contexts (each context's own under ``contexts``), the means
    stacked with each perturbation's own context's control mean."""
    table = pd.concat([part.table.assign(**{CONTEXT: context}) for context, part in parts.items()])
    table = table[[CONTEXT, *[c for c in table.columns if c != CONTEXT]]]
    summaries = {context: part.summary for context, part in parts.items()}
    summary = mean_over_contexts(list(summaries.values()))
    summary.update(
        n_perturbations=sum(s["n_perturbations"] for s in summaries.values()),
        contexts=summaries,
    )
    stacked = {
        "perturbations": np.concatenate(
            [[f"{c}:{p}" for p in part.means["perturbations"]] for c, part in parts.items()]
        ),
        "genes": next(iter(parts.values())).means["genes"],
        "control": np.concatenate(
            [np.tile(p.means["control"], (len(p.table), 1)) for p in parts.values()]
        ),
    }
    for key in ("real", "pred", "de_idx"):
        stacked[key] = np.concatenate([part.means[key] for part in parts.values()])
    return Evaluation(table, summary, stacked)


def _calibration(summary: dict[str, Any], ceiling: dict[str, float]) -> dict[str, Any]:
    """``ceiling``, ``calibrated`` and ``calibrated_mean`` for metrics.json (NaN -> null)."""
    scores = calibrated_scores(summary, summary["baseline"], ceiling)
    return {
        "ceiling": json_numbers(ceiling),
        "calibrated": json_numbers(scores["calibrated"]),
        "calibrated_mean": json_number(scores["calibrated_mean"]),
    }


def _write_outputs(outdir: Path, result: Evaluation) -> None:
    outdir.mkdir(parents=True, exist_ok=True)
    with atomic_path(outdir / "per_perturbation.csv") as tmp:
        result.table.to_csv(tmp)
    with atomic_path(outdir / "means.npz") as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, **result.means)
    write_json_atomic(outdir / "metrics.json", result.summary)
