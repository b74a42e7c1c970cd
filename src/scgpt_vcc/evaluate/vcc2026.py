"""The VCC 2026 metric suite by cell-eval2 (its ``vcc2026`` preset), on raw counts.

cell-eval2 scores six metrics (docs/metrics.md, "VCC 2026"), each calibrated as
``s = (u - b) / (r - b)``: ``u`` the model's value, ``b`` the value of cell-eval2's
mean-response baseline built from the held-out real cells, ``r`` a replicate of the real
cells against themselves (split halves, five splits). 0 is the baseline, 1 a repeat of the
experiment (cell-eval2 clips ``expr_mse_unbiased_capped_norm`` to [0, 1] and floors
``de_wilcoxon_lfc_nmae`` at -6); the score of a context is the mean of the six.

Two steps, both through cell-eval2's own command line (:func:`cell_eval2.cli.main`), so that
its checks and provenance files are the ones the competition uses:

* :func:`build_reference` (once per seed): the baseline prediction and the *real bundle*
  (``prep-real-bundle``: b, r and the identity that binds them) of ``counts/real.h5ad``;
* :func:`score_vcc2026` (per model type): ``run`` on the model's counts, then ``score``
  against the bundle; writes ``metrics_vcc2026.json`` and ``per_perturbation_vcc2026.csv``.

A dataset of one context is scored as a whole (``contexts`` holds it, labelled
``cell_type``). With several, each context has its own real bundle (``{reference}/{context}``)
and is scored on its own cells; the file's score and every metric's u, b, r and s are the
means over contexts, each context's score is under ``contexts`` (:mod:`.contexts`).
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from scgpt_vcc.data.gears import CONTEXT
from scgpt_vcc.errors import InputError
from scgpt_vcc.evaluate.contexts import context_files, mean_over_contexts, several_contexts
from scgpt_vcc.evaluate.run import EvalSettings
from scgpt_vcc.io import atomic_path, read_json, write_json_atomic

log = logging.getLogger(__name__)

PRESET = "vcc2026"
# The label of the one context of a dataset without a context column.
DEFAULT_CONTEXT = CONTEXT
# Rows per chunk when a context's cells are copied out (counts files, float32).
CONTEXT_CHUNK = 10_000


@dataclass(frozen=True)
class Vcc2026Settings:
    control_label: str = EvalSettings.control_label
    perturbation_column: str = EvalSettings.perturbation_column
    threads: int = 2


def cell_eval2_version() -> str:
    return importlib.metadata.version("cell-eval2")


def _preset(settings: Vcc2026Settings) -> list[str]:
    """The flags that make a cell-eval2 step score with the vcc2026 preset on our labels."""
    return [
        "--preset",
        PRESET,
        "--pert-col",
        settings.perturbation_column,
        "--control",
        settings.control_label,
        "--set",
        f"num_threads={settings.threads}",
    ]


def _cell_eval2(*argv: str, checks: Path) -> None:
    """Run one cell-eval2 subcommand in this process. A refusal (cell-eval2 validates its
    input: integer counts, labels, gene axis) becomes an InputError naming ``checks``."""
    from cell_eval2.cli import main

    log.info("cell-eval2 %s", " ".join(argv))
    try:
        main(list(argv))
    except SystemExit as stop:
        if stop.code not in (None, 0):
            raise _refusal(argv[0], checks, str(stop.code)) from None
    except ValueError as err:
        raise _refusal(argv[0], checks, str(err)) from err


def _refusal(command: str, path: Path, reason: str) -> InputError:
    if "degenerate" in reason:  # b = r, or no value: too few perturbations or DE genes
        fix = (
            "hold out more perturbations with more cells (cell-eval2 cannot calibrate a metric "
            "that has no value or whose baseline equals the replicate) or set "
            "evaluate.profiles: [vcc2025]"
        )
    else:
        fix = "give raw integer counts with the real file's genes and labels (scgpt-vcc counts)"
    return InputError(path, "X", f"is refused by cell-eval2 {command}: {reason}", fix)


def build_reference(
    real_counts: str | Path, output: str | Path, settings: Vcc2026Settings = Vcc2026Settings()
) -> None:
    """cell-eval2's real bundle (baseline b and replicate r) of the held-out real counts;
    one per context, in ``output/{context}``, with several contexts."""
    output = Path(output)
    contexts = several_contexts(real_counts)
    if not contexts:
        _build_bundle(real_counts, output, settings)
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.") as tmp,
        context_files({"real": real_counts}, contexts, CONTEXT_CHUNK) as files,
    ):
        bundles = Path(tmp) / "bundles"
        for context in contexts:
            _build_bundle(files[context]["real"], bundles / context, settings)
        if output.exists():
            shutil.rmtree(output)
        os.replace(bundles, output)


def _build_bundle(real_counts: str | Path, output: Path, settings: Vcc2026Settings) -> None:
    """One context's real bundle, written whole or not at all."""
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.") as tmp:
        baseline = Path(tmp) / "baseline.h5ad"
        _cell_eval2(
            "baseline",
            "-ar",
            str(real_counts),
            "--save-pred",
            str(baseline),
            "-o",
            str(Path(tmp) / "baseline"),
            *_preset(settings),
            checks=Path(real_counts),
        )
        bundle = Path(tmp) / "bundle"
        _cell_eval2(
            "prep-real-bundle",
            "--real",
            str(real_counts),
            "--baseline",
            str(baseline),
            "-o",
            str(bundle),
            "--id",
            output.name,
            *_preset(settings),
            checks=Path(real_counts),
        )
        if output.exists():
            shutil.rmtree(output)
        os.replace(bundle, output)


def _agg_means(path: Path) -> dict[str, float]:
    """The ``mean`` row of a cell-eval2 wide aggregate (``agg_results.csv`` and kin)."""
    frame = pd.read_csv(path).set_index("statistic")
    return {name: float(value) for name, value in frame.loc["mean"].items()}


def _number(value: Any) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def read_scores(run_dir: Path, bundle: Path, scored: Path) -> dict[str, dict[str, float | None]]:
    """Per scored metric: the model's value u, baseline b, replicate r and score s."""
    model = _agg_means(run_dir / "agg_results.csv")
    baseline = _agg_means(bundle / "baseline_agg.csv")
    replicate = pd.read_parquet(bundle / "anchor_agg.parquet").set_index("metric")["replicate"]
    scores = pd.read_csv(scored).set_index("metric")["from_replicate"]
    return {
        name: {
            "value": _number(model[name]),
            "baseline": _number(baseline[name]),
            "replicate": _number(replicate[name]),
            "score": _number(scores[name]),
        }
        for name in scores.index
        if name != "avg_score"
    }


def score_vcc2026(
    pred_counts: str | Path,
    real_counts: str | Path,
    reference: str | Path,
    outdir: str | Path,
    model_type: str,
    settings: Vcc2026Settings = Vcc2026Settings(),
) -> dict[str, Any]:
    """Score ``pred_counts`` with the vcc2026 preset against the real bundle ``reference``
    (each context against its own, with several contexts)."""
    reference, outdir = Path(reference), Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    contexts = several_contexts(real_counts)
    if not contexts:
        members, overall, per_perturbation = _score(
            pred_counts, real_counts, reference, settings, outdir
        )
        context_scores = {DEFAULT_CONTEXT: _number(overall)}
    else:
        paths = {"pred": pred_counts, "real": real_counts}
        with context_files(paths, contexts, CONTEXT_CHUNK) as files:
            parts = {
                c: _score(files[c]["pred"], files[c]["real"], reference / c, settings, outdir)
                for c in contexts
            }
        members = mean_over_contexts([part[0] for part in parts.values()])
        overall = mean_over_contexts([_number(part[1]) for part in parts.values()])
        context_scores = {c: _number(part[1]) for c, part in parts.items()}
        per_perturbation = pd.concat(
            [
                part[2].assign(**{CONTEXT: c}).set_index(CONTEXT, append=True)
                for c, part in parts.items()
            ]
        ).reorder_levels([CONTEXT, "perturbation"])
    with atomic_path(outdir / "per_perturbation_vcc2026.csv") as path:
        # expr_mse_unbiased_capped_norm exists only for the aggregate (a ratio of two means).
        per_perturbation[[m for m in members if m in per_perturbation.columns]].to_csv(path)
    summary = {
        "model_type": model_type,
        "profile": PRESET,
        "score": _number(overall if overall is not None else math.nan),
        "metrics": members,
        "contexts": context_scores,
        "n_perturbations": int(len(per_perturbation)),
        "cell_eval2_version": cell_eval2_version(),
        "reference": str(reference),
    }
    write_json_atomic(outdir / "metrics_vcc2026.json", summary)
    log.info("%s vcc2026 score %.3f", model_type, summary["score"] or math.nan)
    return summary


def _score(
    pred_counts: str | Path,
    real_counts: str | Path,
    reference: Path,
    settings: Vcc2026Settings,
    workdir: Path,
) -> tuple[dict[str, dict[str, float | None]], float, pd.DataFrame]:
    """One context: per metric u, b, r and s, the overall score and per-perturbation values
    (cell-eval2's run written under ``workdir`` meanwhile)."""
    if not (reference / "manifest.json").exists():
        raise InputError(reference, "manifest.json", "is missing", "run vcc2026-reference")
    with tempfile.TemporaryDirectory(dir=workdir, prefix=".cell_eval2.") as tmp:
        run_dir, scored = Path(tmp) / "run", Path(tmp) / "scored.csv"
        _cell_eval2(
            "run",
            "-ap",
            str(pred_counts),
            "-ar",
            str(real_counts),
            "-o",
            str(run_dir),
            *_preset(settings),
            checks=Path(pred_counts),
        )
        _cell_eval2(
            "score",
            "--user-agg",
            str(run_dir / "agg_results.csv"),
            "--real-bundle",
            str(reference),
            "-o",
            str(scored),
            checks=Path(pred_counts),
        )
        members = read_scores(run_dir, reference, scored)
        overall = pd.read_csv(scored).set_index("metric").loc["avg_score", "from_replicate"]
        per_perturbation = pd.read_csv(run_dir / "results.csv").pivot(
            index="perturbation", columns="metric", values="value"
        )
    return members, float(overall), per_perturbation


def collect_vcc2026(
    eval_dir: str | Path, seeds: Sequence[int], model_types: Sequence[str]
) -> pd.DataFrame:
    """Every run's metrics_vcc2026.json as rows (seed, model_type, metric, value, baseline,
    replicate, score); the metric ``score`` is the overall calibrated score."""
    rows = []
    for seed in seeds:
        for model in model_types:
            path = Path(eval_dir) / f"seed{seed}" / model / "metrics_vcc2026.json"
            data = read_json(path, f"run evaluate_vcc2026 for {model}")
            rows.append(
                {"seed": seed, "model_type": model, "metric": "score", "score": data["score"]}
            )
            for name, entry in data["metrics"].items():
                rows.append({"seed": seed, "model_type": model, "metric": name, **entry})
    return pd.DataFrame(rows).astype(
        {c: float for c in ("value", "baseline", "replicate", "score")}
    )


def vcc2026_markdown(frame: pd.DataFrame) -> list[str]:
    """The summary's VCC 2026 section: calibrated score per model and metric (mean over
    seeds), with the raw value u and the anchors b and r of the first seed."""
    means = frame.groupby(["model_type", "metric"], sort=False)[["value", "score"]].mean()
    anchors = (
        frame[frame["seed"] == frame["seed"].min()]
        .groupby("metric", sort=False)[["baseline", "replicate"]]
        .first()
    )
    metrics = [m for m in dict.fromkeys(frame["metric"]) if m != "score"]
    models = list(dict.fromkeys(frame["model_type"]))
    lines = [
        "## VCC 2026 (cell-eval2, profile vcc2026)",
        "",
        "Calibrated score s = (u − b) / (r − b) per metric: 0 = cell-eval2's mean-response "
        "baseline b, 1 = a replicate r of the real cells (cell-eval2 clips "
        "expr_mse_unbiased_capped_norm to [0, 1]); `score` = mean of the six. "
        "Cells: s (raw u).",
        "",
        "| model_type | score | " + " | ".join(metrics) + " |",
        "|" + "---|" * (len(metrics) + 2),
    ]
    for model in models:
        cells = [f"{means.loc[(model, 'score'), 'score']:.3f}"]
        cells += [
            f"{means.loc[(model, m), 'score']:.3f} ({means.loc[(model, m), 'value']:.3f})"
            for m in metrics
        ]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines.append(
        "| b / r | | "
        + " | ".join(
            f"{anchors.loc[m, 'baseline']:.3f} / {anchors.loc[m, 'replicate']:.3f}" for m in metrics
        )
        + " |"
    )
    return lines
