"""Evaluation plots for the Snakemake report (PNG, fixed names in ``plots_dir``).

- ``metrics.png``: one panel per metric, a bar per model type, sd over seeds as error bars
  (the calibrated ``vcc2026_*`` scores with lines at 0, the baseline, and 1, a replicate);
- ``per_perturbation.png``: per-perturbation bars (mean over seeds) of a few key metrics;
- ``change_scatter.png``: predicted vs true change from the control mean, all genes, for
  the strongest held-out perturbations (largest true change, first seed), one row per model
  type; the perturbation's top DE genes are highlighted;
- ``calibrated.png``: each model's calibrated VCC scores (DES, PDS, MAE and their mean)
  between 0 (the baseline) and 1 (the ceiling of the held-out real cells), sd over seeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from scgpt_vcc.evaluate.summary import (  # noqa: E402
    CALIBRATED_MEAN,
    CALIBRATED_PREFIX,
    calibrated_column,
)
from scgpt_vcc.evaluate.vcc import VCC_METRICS  # noqa: E402
from scgpt_vcc.io import save_figure  # noqa: E402

PLOT_FILES = ("metrics.png", "per_perturbation.png", "change_scatter.png", "calibrated.png")
PER_PERTURBATION_METRICS = ("pearson_delta", "des", "mae")
# The calibrated plot's y range: 0 to 1 with room around; bars beyond are cut and labelled.
CALIBRATED_VIEW = (-1.0, 1.5)
VCC2025_CALIBRATED = (*(calibrated_column(m) for m in VCC_METRICS), CALIBRATED_MEAN)
N_STRONGEST = 4
DPI = 110


def plot_metric_bars(summary: pd.DataFrame, path: Path) -> None:
    metrics = list(dict.fromkeys(summary["metric"]))
    models = list(dict.fromkeys(summary["model_type"]))
    ncols = 4
    nrows = int(np.ceil(len(metrics) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 3 * nrows), squeeze=False)
    by_key = summary.set_index(["metric", "model_type"])
    for ax, metric in zip(axes.flat, metrics, strict=False):
        means = [by_key.loc[(metric, m), "mean"] for m in models]
        sds = np.nan_to_num([by_key.loc[(metric, m), "sd"] for m in models])
        ax.bar(range(len(models)), means, yerr=sds, capsize=3, color="tab:blue")
        ax.set_xticks(range(len(models)), models, rotation=45, ha="right")
        ax.set_title(metric)
        if metric.startswith(CALIBRATED_PREFIX) or metric in VCC2025_CALIBRATED:
            # calibrated: 0 = baseline, 1 = replicate (VCC 2026) or ceiling (VCC 2025)
            ax.axhline(0, color="grey", lw=0.8)
            ax.axhline(1, color="tab:green", lw=0.8, ls="--")
    for ax in axes.flat[len(metrics) :]:
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path, dpi=DPI)


def plot_per_perturbation(per_perturbation: pd.DataFrame, path: Path) -> None:
    models = list(dict.fromkeys(per_perturbation["model_type"]))
    means = per_perturbation.groupby(["perturbation", "model_type"], sort=True).mean(
        numeric_only=True
    )
    perts = sorted(per_perturbation["perturbation"].unique())
    width = 0.8 / len(models)
    fig, axes = plt.subplots(
        len(PER_PERTURBATION_METRICS),
        1,
        figsize=(max(8, 0.35 * len(perts) * len(models) / 2), 9),
        squeeze=False,
    )
    for ax, metric in zip(axes[:, 0], PER_PERTURBATION_METRICS, strict=True):
        for k, model in enumerate(models):
            values = [means.loc[(p, model), metric] for p in perts]
            ax.bar(np.arange(len(perts)) + k * width, values, width, label=model)
        ax.set_ylabel(metric)
        ax.set_xticks(np.arange(len(perts)) + 0.4 - width / 2, perts, rotation=90, fontsize=7)
    axes[0, 0].legend(fontsize=7, ncol=len(models))
    axes[0, 0].set_title("Per held-out perturbation (mean over seeds)")
    fig.tight_layout()
    save_figure(fig, path, dpi=DPI)


def plot_change_scatter(eval_dir: Path, seed: int, model_types: Sequence[str], path: Path) -> None:
    loaded = {m: np.load(eval_dir / f"seed{seed}" / m / "means.npz") for m in model_types}
    first = loaded[model_types[0]]
    true_change = first["real"] - first["control"]
    strongest = np.argsort(-np.linalg.norm(true_change, axis=1))[:N_STRONGEST]
    fig, axes = plt.subplots(
        len(model_types),
        len(strongest),
        figsize=(3 * len(strongest), 3 * len(model_types)),
        squeeze=False,
    )
    for row, model in enumerate(model_types):
        data = loaded[model]
        for col, p in enumerate(strongest):
            ax = axes[row, col]
            # One control mean, or one per perturbation (its context's) with several contexts.
            control = data["control"][p] if data["control"].ndim == 2 else data["control"]
            x = data["real"][p] - control
            y = data["pred"][p] - control
            de = data["de_idx"][p][data["de_idx"][p] >= 0]
            ax.scatter(x, y, s=2, color="0.6", rasterized=True)
            ax.scatter(x[de], y[de], s=8, color="tab:red", label="top DE")
            lim = max(np.abs(x).max(), np.abs(y).max(), 1e-6)
            ax.plot([-lim, lim], [-lim, lim], color="k", lw=0.5)
            ax.set_title(f"{model}: {data['perturbations'][p]}", fontsize=8)
            if col == 0:
                ax.set_ylabel("predicted change")
            if row == len(model_types) - 1:
                ax.set_xlabel("true change")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=DPI)


def plot_calibrated(summary: pd.DataFrame, path: Path) -> None:
    """Calibrated scores per metric, a bar per model, with lines at 0 (baseline) and 1 (ceiling)."""
    columns = list(VCC2025_CALIBRATED)
    labels = [*(m.upper() for m in VCC_METRICS), "mean"]
    fig, ax = plt.subplots(figsize=(8, 4))
    rows = summary[summary["metric"].isin(columns)]
    if rows.empty:
        ax.text(0.5, 0.5, "no ceiling: evaluate ran without --ceiling", ha="center")
        ax.axis("off")
        save_figure(fig, path, dpi=DPI)
        return
    models = list(dict.fromkeys(summary["model_type"]))
    by_key = rows.set_index(["metric", "model_type"])
    width = 0.8 / len(models)
    for k, model in enumerate(models):
        means = [by_key["mean"].get((c, model), np.nan) for c in columns]
        sds = np.nan_to_num([by_key["sd"].get((c, model), np.nan) for c in columns])
        x = np.arange(len(columns)) + (k - (len(models) - 1) / 2) * width
        ax.bar(x, means, width, yerr=sds, capsize=2, label=model)  # NaN: no bar
        for xi, value in zip(x, means, strict=True):
            if not CALIBRATED_VIEW[0] <= value <= CALIBRATED_VIEW[1]:  # cut bar: its value
                edge = float(np.clip(value, *CALIBRATED_VIEW))
                va = "bottom" if value < 0 else "top"
                ax.text(xi, edge, f"{value:.2f}", rotation=90, ha="center", va=va, fontsize=7)
    ax.axhline(0, color="k", lw=1)
    ax.axhline(1, color="tab:green", lw=1, ls="--")
    ax.text(len(columns) - 0.5, 0, " baseline", va="bottom", ha="right", fontsize=8)
    ax.text(len(columns) - 0.5, 1, " ceiling", va="bottom", ha="right", fontsize=8)
    ax.set_ylim(*CALIBRATED_VIEW)
    ax.set_xticks(range(len(columns)), labels)
    ax.set_ylabel("calibrated score (u − b)/(r − b)")
    ax.set_title("VCC 2025: 0 = baseline, 1 = a repeat of the experiment (mean over seeds)")
    ax.legend(fontsize=7, ncol=min(len(models), 3), loc="upper left", bbox_to_anchor=(1, 1))
    fig.tight_layout()
    save_figure(fig, path, dpi=DPI)


def write_plots(
    eval_dir: Path,
    seeds: Sequence[int],
    model_types: Sequence[str],
    summary: pd.DataFrame,
    per_perturbation: pd.DataFrame,
    plots_dir: Path,
) -> None:
    plots_dir.mkdir(parents=True, exist_ok=True)
    plot_metric_bars(summary, plots_dir / PLOT_FILES[0])
    plot_per_perturbation(per_perturbation, plots_dir / PLOT_FILES[1])
    plot_change_scatter(eval_dir, seeds[0], model_types, plots_dir / PLOT_FILES[2])
    plot_calibrated(summary, plots_dir / PLOT_FILES[3])
