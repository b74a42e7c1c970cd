"""Summary over seeds and model types: mean ± sd per metric and paired wins over train_mean.

Reads ``{eval_dir}/seed{seed}/{model_type}/metrics.json`` and ``per_perturbation.csv``
and writes ``summary.csv`` (one row per model type and metric), ``summary.md`` (the
same as markdown tables) and the plots of :mod:`scgpt_vcc.evaluate.plots`.

With the VCC 2025 ceiling in metrics.json (``evaluate --ceiling``), every VCC metric also
has rows ``{metric}_ceiling`` and ``{metric}_calibrated`` and there is ``calibrated_mean``;
summary.md shows them as the table "VCC 2025: raw | ceiling | calibrated".

Uncertainty: the standard deviation is over seeds (ddof = 1; empty with one seed). The
paired comparison pools (seed, perturbation) pairs: a model wins a pair when its value
is better than train_mean's on the same perturbation of the same seed (higher for
correlations, DES and PDS; lower for errors); equal values are ties.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from scgpt_vcc.data.gears import CONTEXT
from scgpt_vcc.errors import InputError
from scgpt_vcc.evaluate.run import ALL_METRICS, BASELINE_MODEL, PROFILES
from scgpt_vcc.evaluate.vcc import VCC_METRICS
from scgpt_vcc.io import write_text_atomic

SUMMARY_METRICS = (*ALL_METRICS, "challenge_score")
LOWER_IS_BETTER = frozenset({"mse", "mse_de", "mae"})
# summary.csv's metrics scored between a baseline (0) and a replicate of the data (1).
CALIBRATED_PREFIX = "vcc2026_"
CALIBRATED_MEAN = "calibrated_mean"


def ceiling_column(metric: str) -> str:
    return f"{metric}_ceiling"


def calibrated_column(metric: str) -> str:
    return f"{metric}_calibrated"


def calibration_fields(metrics: dict) -> dict[str, float]:
    """Ceiling and calibrated score of every VCC metric in one metrics.json (null -> NaN);
    nothing when it was evaluated without a ceiling."""
    if "ceiling" not in metrics:
        return {}
    fields = {}
    for name in VCC_METRICS:
        fields[ceiling_column(name)] = metrics["ceiling"][name]
        fields[calibrated_column(name)] = metrics["calibrated"][name]
    fields[CALIBRATED_MEAN] = metrics[CALIBRATED_MEAN]
    return {key: np.nan if value is None else float(value) for key, value in fields.items()}


def run_dir(eval_dir: Path, seed: int, model_type: str) -> Path:
    return Path(eval_dir) / f"seed{seed}" / model_type


def collect(
    eval_dir: str | Path, seeds: Sequence[int], model_types: Sequence[str]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """All runs' metrics.json (one row per seed and model) and per-perturbation tables."""
    runs, tables = [], []
    for seed in seeds:
        for model in model_types:
            folder = run_dir(Path(eval_dir), seed, model)
            path = folder / "metrics.json"
            if not path.exists():
                raise InputError(path, "file", "does not exist", f"run evaluate for {model}")
            data = json.loads(path.read_text())
            runs.append(
                {
                    "seed": seed,
                    "model_type": model,
                    **{k: data[k] for k in SUMMARY_METRICS},
                    **calibration_fields(data),
                }
            )
            table = pd.read_csv(folder / "per_perturbation.csv")
            if CONTEXT in table:  # several contexts: one row per (context, perturbation)
                table["perturbation"] = table[CONTEXT] + ":" + table["perturbation"]
            tables.append(table.assign(seed=seed, model_type=model))
    return pd.DataFrame(runs), pd.concat(tables, ignore_index=True)


def seed_statistics(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean, sd (ddof 1) and number of seeds per model type and metric."""
    long = runs.melt(id_vars=["seed", "model_type"], var_name="metric", value_name="value")
    stats = long.groupby(["model_type", "metric"], sort=False)["value"].agg(
        mean="mean", sd=lambda v: v.std(ddof=1), n_seeds="count"
    )
    return stats.reset_index()


def paired_wins(per_perturbation: pd.DataFrame, baseline: str = BASELINE_MODEL) -> pd.DataFrame:
    """Wins, ties and losses of every other model against ``baseline``, per metric."""
    if baseline not in set(per_perturbation["model_type"]):
        return pd.DataFrame(columns=["model_type", "metric", "wins", "ties", "losses", "n_pairs"])
    keyed = per_perturbation.set_index(["seed", "perturbation"])
    base = keyed[keyed["model_type"] == baseline]
    rows = []
    for model, group in keyed[keyed["model_type"] != baseline].groupby("model_type", sort=False):
        for metric in ALL_METRICS:
            a, b = group[metric].align(base[metric], join="inner")
            diff = (b - a) if metric in LOWER_IS_BETTER else (a - b)
            rows.append(
                {
                    "model_type": model,
                    "metric": metric,
                    "wins": int((diff > 0).sum()),
                    "ties": int((diff == 0).sum()),
                    "losses": int((diff < 0).sum()),
                    "n_pairs": int(diff.notna().sum()),
                }
            )
    return pd.DataFrame(rows)


def summary_frame(runs: pd.DataFrame, per_perturbation: pd.DataFrame) -> pd.DataFrame:
    stats = seed_statistics(runs)
    wins = paired_wins(per_perturbation)
    return stats.merge(wins, on=["model_type", "metric"], how="left")


def _cell(mean: float, sd: float) -> str:
    return f"{mean:.4f}" if np.isnan(sd) else f"{mean:.4f} ± {sd:.4f}"


def summary_markdown(summary: pd.DataFrame, runs: pd.DataFrame, notes: Sequence[str]) -> str:
    models = list(dict.fromkeys(summary["model_type"]))
    seeds = sorted(runs["seed"].unique())
    head = ["model_type", *SUMMARY_METRICS]
    lines = [
        "# Evaluation summary",
        "",
        f"Mean ± sd over seeds {', '.join(map(str, seeds))} (held-out perturbations only; "
        "definitions in docs/metrics.md).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    by_key = summary.set_index(["model_type", "metric"])
    for model in models:
        cells = [
            _cell(by_key.loc[(model, m), "mean"], by_key.loc[(model, m), "sd"])
            for m in SUMMARY_METRICS
        ]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    others = [m for m in models if m != BASELINE_MODEL]
    if BASELINE_MODEL in models and others:
        lines += [
            "",
            f"## Paired comparison with {BASELINE_MODEL}",
            "",
            "Perturbations (pooled over seeds) on which the model beats train_mean: "
            "wins / ties / losses.",
            "",
            "| model_type | " + " | ".join(ALL_METRICS) + " |",
            "|" + "---|" * (len(ALL_METRICS) + 1),
        ]
        for model in others:
            cells = []
            for m in ALL_METRICS:
                row = by_key.loc[(model, m)]
                cells.append(f"{int(row['wins'])}/{int(row['ties'])}/{int(row['losses'])}")
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines += calibration_markdown(by_key, models)
    lines += ["", *[f"- {note}" for note in notes], ""]
    return "\n".join(lines)


def calibration_markdown(by_key: pd.DataFrame, models: Sequence[str]) -> list[str]:
    """The table "VCC 2025: raw | ceiling | calibrated" (none without ceilings)."""
    if CALIBRATED_MEAN not in by_key.index.get_level_values("metric"):
        return []
    lines = [
        "",
        "## VCC 2025: raw | ceiling | calibrated",
        "",
        "Per VCC metric: the model's value, the ceiling of the held-out real cells (a repeat "
        "of the experiment) and the calibrated score (u − b)/(r − b), 0 at the challenge "
        "score's baseline and 1 at the ceiling (docs/metrics.md). Means over seeds.",
        "",
        "| model_type | "
        + " | ".join(f"{m.upper()}: raw / ceiling / calibrated" for m in VCC_METRICS)
        + " | calibrated mean |",
        "|" + "---|" * (len(VCC_METRICS) + 2),
    ]
    for model in models:
        cells = [
            " / ".join(
                _number(by_key.loc[(model, column), "mean"])
                for column in (name, ceiling_column(name), calibrated_column(name))
            )
            for name in VCC_METRICS
        ]
        cells.append(_number(by_key.loc[(model, CALIBRATED_MEAN), "mean"]))
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return lines


def collect_contexts(
    eval_dir: str | Path, seeds: Sequence[int], model_types: Sequence[str]
) -> pd.DataFrame:
    """Each run's per-context numbers (several cell contexts; empty otherwise)."""
    rows = []
    for seed in seeds:
        for model in model_types:
            path = run_dir(Path(eval_dir), seed, model) / "metrics.json"
            for context, data in json.loads(path.read_text()).get("contexts", {}).items():
                values = {k: data[k] for k in SUMMARY_METRICS}
                rows.append({"seed": seed, "model_type": model, CONTEXT: context, **values})
    return pd.DataFrame(rows)


def contexts_markdown(frame: pd.DataFrame) -> list[str]:
    """The table of every model's numbers in each context (means over seeds)."""
    if frame.empty:
        return []
    means = frame.groupby(["model_type", CONTEXT], sort=False)[list(SUMMARY_METRICS)].mean()
    lines = [
        "## Per cell context",
        "",
        "Every number above is the mean over the contexts below, each scored on its own "
        "cells against its own controls (docs/metrics.md). Means over seeds.",
        "",
        f"| model_type | {CONTEXT} | " + " | ".join(SUMMARY_METRICS) + " |",
        "|" + "---|" * (len(SUMMARY_METRICS) + 2),
    ]
    for (model, context), row in means.iterrows():
        cells = " | ".join(f"{row[m]:.4f}" for m in SUMMARY_METRICS)
        lines.append(f"| {model} | {context} | {cells} |")
    return lines


def _number(value: float) -> str:
    return "n/a" if np.isnan(value) else f"{value:.4f}"


def summarize(
    eval_dir: str | Path,
    seeds: Sequence[int],
    model_types: Sequence[str],
    out_md: str | Path,
    out_csv: str | Path,
    plots_dir: str | Path | None = None,
    profiles: Sequence[str] = PROFILES[:1],
) -> pd.DataFrame:
    """Write summary.csv, summary.md and (if ``plots_dir``) the evaluation plots.

    With profile ``vcc2026``, cell-eval2's calibrated scores join summary.csv as metrics
    ``vcc2026_<metric>`` (and ``vcc2026_score``) and summary.md gets their section.
    """
    runs, per_perturbation = collect(eval_dir, seeds, model_types)
    summary = summary_frame(runs, per_perturbation)
    vcc2026 = None
    if "vcc2026" in profiles:
        from scgpt_vcc.evaluate.vcc2026 import collect_vcc2026

        vcc2026 = collect_vcc2026(eval_dir, seeds, model_types)
        scores = vcc2026.assign(metric=CALIBRATED_PREFIX + vcc2026["metric"])
        scores = scores.pivot(index=["seed", "model_type"], columns="metric", values="score")
        summary = pd.concat([summary, seed_statistics(scores.reset_index())], ignore_index=True)
    first = json.loads(
        (run_dir(Path(eval_dir), seeds[0], model_types[0]) / "metrics.json").read_text()
    )
    notes = [
        f"{first['n_perturbations']} held-out perturbations per seed"
        + (f" (summed over {len(first['contexts'])} cell contexts)" if "contexts" in first else "")
        + f"; cell-eval {first['cell_eval_version']} (profile vcc).",
        "challenge_score and the VCC 2025 calibrated scores: against "
        + ("this run's train_mean" if BASELINE_MODEL in model_types else "the configured baseline")
        + " (0 for train_mean itself).",
        "sd is empty with a single seed.",
    ]
    write_text_atomic(out_csv, summary.to_csv(index=False))
    markdown = summary_markdown(summary, runs, notes)
    per_context = contexts_markdown(collect_contexts(eval_dir, seeds, model_types))
    if per_context:
        markdown += "\n" + "\n".join(per_context) + "\n"
    if vcc2026 is not None:
        from scgpt_vcc.evaluate.vcc2026 import vcc2026_markdown

        markdown += "\n" + "\n".join(vcc2026_markdown(vcc2026)) + "\n"
    write_text_atomic(out_md, markdown)
    if plots_dir is not None:
        from scgpt_vcc.evaluate.plots import write_plots

        write_plots(Path(eval_dir), seeds, model_types, summary, per_perturbation, Path(plots_dir))
    return summary
