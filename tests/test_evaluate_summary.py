"""Summary over seeds: mean ± sd and paired wins over train_mean on a hand-made example."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scgpt_vcc.cli import main
from scgpt_vcc.evaluate.run import ALL_METRICS, PROFILES
from scgpt_vcc.evaluate.summary import SUMMARY_METRICS, summarize

# model -> seed -> per-perturbation values of every metric (P1, P2).
VALUES = {
    "train_mean": {1: [0.5, 0.5], 2: [0.4, 0.6]},
    "linear": {1: [0.6, 0.5], 2: [0.3, 0.9]},
}


def write_run(
    root: Path, seed: int, model: str, values: list[float], calibration: dict | None = None
) -> None:
    folder = root / f"seed{seed}" / model
    folder.mkdir(parents=True)
    table = pd.DataFrame(
        {m: values for m in ALL_METRICS}, index=pd.Index(["P1", "P2"], name="perturbation")
    )
    table.to_csv(folder / "per_perturbation.csv")
    metrics = {m: float(np.mean(values)) for m in SUMMARY_METRICS}
    metrics.update(n_perturbations=2, cell_eval_version="0.8.2", **(calibration or {}))
    (folder / "metrics.json").write_text(json.dumps(metrics))
    rng = np.random.default_rng(seed)
    np.savez(
        folder / "means.npz",
        perturbations=np.array(["P1", "P2"]),
        genes=np.array(["g0", "g1", "g2"]),
        real=rng.random((2, 3)),
        pred=rng.random((2, 3)),
        control=rng.random(3),
        de_idx=np.array([[0, 1], [2, -1]]),
    )


def summarize_runs(tmp_path: Path) -> Path:
    out = tmp_path / "summary"
    assert (
        main(
            [
                "summarize",
                "--eval-dir",
                str(tmp_path),
                "--seeds",
                "1",
                "2",
                "--model-types",
                "train_mean",
                "linear",
                "--out-md",
                str(out / "summary.md"),
                "--out-csv",
                str(out / "summary.csv"),
                "--plots-dir",
                str(out / "plots"),
            ]
        )
        == 0
    )
    return out


def test_mean_sd_and_wins(tmp_path: Path) -> None:
    for model, seeds in VALUES.items():
        for seed, values in seeds.items():
            write_run(tmp_path, seed, model, values)
    out = summarize_runs(tmp_path)
    table = pd.read_csv(out / "summary.csv").set_index(["model_type", "metric"])
    # linear pearson per seed: mean(0.6, 0.5) = 0.55 and mean(0.3, 0.9) = 0.6.
    row = table.loc[("linear", "pearson")]
    assert row["mean"] == pytest.approx(0.575)
    assert row["sd"] == pytest.approx(np.std([0.55, 0.6], ddof=1))
    assert row["n_seeds"] == 2
    # Pairs (seed, perturbation): 0.6>0.5 win, 0.5=0.5 tie, 0.3<0.4 loss, 0.9>0.6 win.
    assert (row["wins"], row["ties"], row["losses"], row["n_pairs"]) == (2, 1, 1, 4)
    # For an error metric lower is better: the same numbers flip.
    mae = table.loc[("linear", "mae")]
    assert (mae["wins"], mae["ties"], mae["losses"]) == (1, 1, 2)
    assert np.isnan(table.loc[("train_mean", "pearson"), "wins"])
    text = (out / "summary.md").read_text()
    assert "| linear | 0.5750 ± 0.0354" in text
    assert "2/1/1" in text
    assert "## VCC 2025" not in text  # evaluated without a ceiling
    for name in ("metrics.png", "per_perturbation.png", "change_scatter.png", "calibrated.png"):
        assert (out / "plots" / name).stat().st_size > 1000


def test_ceiling_and_calibrated_scores(tmp_path: Path) -> None:
    ceiling = {"des": 0.8, "pds": 0.9, "mae": 0.1}
    calibrated = {
        "train_mean": {
            1: {"des": 0.0, "pds": 0.0, "mae": 0.0},
            2: {"des": 0.0, "pds": 0.0, "mae": 0.0},
        },
        "linear": {
            1: {"des": 0.5, "pds": None, "mae": 0.2},
            2: {"des": 0.3, "pds": 0.6, "mae": 0.4},
        },
    }
    for model, seeds in VALUES.items():
        for seed, values in seeds.items():
            scores = calibrated[model][seed]
            finite = [v for v in scores.values() if v is not None]
            write_run(
                tmp_path,
                seed,
                model,
                values,
                {
                    "ceiling": ceiling,
                    "calibrated": scores,
                    "calibrated_mean": float(np.mean(finite)),
                },
            )
    out = summarize_runs(tmp_path)
    table = pd.read_csv(out / "summary.csv").set_index(["model_type", "metric"])
    assert table.loc[("linear", "des_calibrated"), "mean"] == pytest.approx(0.4)
    # A null calibrated score (ceiling == baseline) is left out of the mean over seeds.
    assert table.loc[("linear", "pds_calibrated"), "mean"] == pytest.approx(0.6)
    assert table.loc[("linear", "pds_calibrated"), "n_seeds"] == 1
    assert table.loc[("linear", "calibrated_mean"), "mean"] == pytest.approx((0.35 + 1.3 / 3) / 2)
    assert table.loc[("train_mean", "mae_ceiling"), "mean"] == pytest.approx(0.1)
    text = (out / "summary.md").read_text()
    assert "## VCC 2025: raw | ceiling | calibrated" in text
    # linear's mean DES over seeds: mean(0.55, 0.6); ceiling 0.8; calibrated 0.4.
    assert "| linear | 0.5750 / 0.8000 / 0.4000 | 0.5750 / 0.9000 / 0.6000 |" in text
    assert "| train_mean | 0.5000 / 0.8000 / 0.0000 |" in text
    assert (out / "plots" / "calibrated.png").stat().st_size > 1000


def test_vcc2026_scores_join_the_summary(tmp_path: Path) -> None:
    """With profile vcc2026 each model's calibrated scores are summary metrics too."""
    members = ("pds_cosine", "de_wilcoxon_sig_jaccard")
    for model, seeds in VALUES.items():
        for seed, values in seeds.items():
            write_run(tmp_path, seed, model, values)
            score = float(np.mean(values))  # e.g. linear: 0.55 (seed 1) and 0.6 (seed 2)
            entry = {"value": 0.5, "baseline": 0.4, "replicate": 0.9, "score": score}
            document = {"score": score, "metrics": {m: entry for m in members}}
            (tmp_path / f"seed{seed}" / model / "metrics_vcc2026.json").write_text(
                json.dumps(document)
            )
    out = tmp_path / "summary"
    summary = summarize(
        tmp_path, [1, 2], list(VALUES), out / "summary.md", out / "summary.csv",
        plots_dir=out / "plots", profiles=PROFILES,
    )  # fmt: skip
    row = summary.set_index(["model_type", "metric"]).loc[("linear", "vcc2026_score")]
    assert row["mean"] == pytest.approx(0.575) and row["n_seeds"] == 2
    assert ("linear", "vcc2026_pds_cosine") in summary.set_index(["model_type", "metric"]).index
    text = (out / "summary.md").read_text()
    assert "## VCC 2026" in text and "| linear | 0.575 |" in text
    assert "| b / r | | 0.400 / 0.900 | 0.400 / 0.900 |" in text
