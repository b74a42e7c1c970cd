"""The VCC 2025 ceiling against cell-eval's own ``compute_ceiling``, and calibrated scores."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from scgpt_vcc.cli import main
from scgpt_vcc.errors import InputError
from scgpt_vcc.evaluate.ceiling import (
    calibrated_score,
    calibrated_scores,
    ceiling_from_half_split,
    disjoint_halves,
    read_ceiling,
    vcc_ceiling,
)
from scgpt_vcc.evaluate.run import EvalSettings
from scgpt_vcc.evaluate.vcc import cell_eval_evaluator, per_perturbation_table
from scgpt_vcc.io import read_annotations
from tests.eval_support import CONTROL, write_cells, write_noisy_pair, write_processed

SEED = 3


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The noisy pair's real cells with uneven groups (one odd, one of a single cell) and two
    perturbations without effect, which the halves cannot tell apart (PDS < 1)."""
    folder = tmp_path_factory.mktemp("ceiling")
    real_path, _, perts = write_noisy_pair(folder)
    cells = ad.read_h5ad(real_path)
    labels = cells.obs["target_gene"].astype(str).to_numpy()
    keep = np.ones(len(labels), bool)
    keep[np.flatnonzero(labels == perts[2])[:1]] = False  # 29 cells: one left over
    keep[np.flatnonzero(labels == perts[3])[1:]] = False  # 1 cell: cannot be split
    controls = np.flatnonzero(labels == CONTROL)
    keep[controls[0]] = False  # 59 controls remain
    labels[controls[1:16]] = "NULL_A"
    labels[controls[16:31]] = "NULL_B"
    return write_cells(
        folder / "uneven.h5ad",
        cells.X[keep].toarray(),
        list(labels[keep]),
        list(cells.var_names),
    )


@pytest.fixture(scope="module")
def cell_eval_ceiling(real: Path):
    """cell-eval's own ceiling-only run: halves, per-perturbation and aggregate scores."""
    with tempfile.TemporaryDirectory() as tmp:
        evaluator = cell_eval_evaluator(
            ad.read_h5ad(real), None, CONTROL, "target_gene", outdir=tmp, num_threads=1
        )
        halves = evaluator._disjoint_halves(SEED)
        results, agg = evaluator.compute_ceiling(profile="vcc", seed=SEED, write_csv=False)
    return halves, per_perturbation_table(results), agg.to_pandas().iloc[0]


@pytest.fixture(scope="module")
def ours(real: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    output = tmp_path_factory.mktemp("ours") / "ceiling_vcc2025.json"
    settings = EvalSettings(chunk_size=16, vcc_group_size=3, threads=1, ceiling_seed=SEED)
    vcc_ceiling(real, output, settings)
    return json.loads(output.read_text())


def test_same_halves_as_cell_eval(real: Path, cell_eval_ceiling) -> None:
    (first, second), _, _ = cell_eval_ceiling
    obs, _ = read_annotations(real)
    halves = disjoint_halves(obs, "target_gene", SEED)
    assert list(obs.index[halves.first]) == list(first.obs_names)
    assert list(obs.index[halves.second]) == list(second.obs_names)
    assert halves.dropped == ("GENE3",)
    assert not set(halves.first) & set(halves.second)
    other = disjoint_halves(obs, "target_gene", SEED + 1)
    assert list(other.first) != list(halves.first)


def test_half_split_and_ceiling_equal_cell_eval(ours: dict, cell_eval_ceiling) -> None:
    _, theirs, agg = cell_eval_ceiling
    table = pd.DataFrame.from_dict(ours["per_perturbation"], orient="index")
    assert sorted(table.index) == sorted(theirs.index)
    assert "GENE3" not in table.index and ours["dropped_perturbations"] == ["GENE3"]
    theirs = theirs.loc[table.index]
    # Not trivial: the halves disagree on some DE genes and on the null perturbations.
    assert 0 < theirs["des"].mean() < 1 and theirs["pds"].min() < 1
    np.testing.assert_array_equal(table["des"].to_numpy(), theirs["des"].to_numpy())
    np.testing.assert_array_equal(table["pds"].to_numpy(), theirs["pds"].to_numpy())
    np.testing.assert_allclose(table["mae"].to_numpy(), theirs["mae"].to_numpy(), rtol=1e-6)
    metrics = ours["metrics"]
    assert metrics["des"]["half_split"] == pytest.approx(theirs["des"].mean(), abs=1e-12)
    assert metrics["pds"]["half_split"] == pytest.approx(theirs["pds"].mean(), abs=1e-12)
    # Spearman-Brown as cell-eval aggregates it; cell-eval gives MAE no ceiling.
    assert ours["ceiling"]["des"] == pytest.approx(agg["overlap_at_N"], abs=1e-12)
    assert ours["ceiling"]["pds"] == pytest.approx(agg["discrimination_score_l1"], abs=1e-12)
    assert math.isnan(agg["mae"])
    assert ours["ceiling"]["mae"] == pytest.approx(metrics["mae"]["half_split"] / 2)
    assert ours["seed"] == SEED and ours["n_cells_per_half"] == len(cell_eval_ceiling[0][0])


def test_ceiling_rules() -> None:
    ceiling = ceiling_from_half_split({"des": 0.5, "pds": 0.0, "mae": 0.04})
    assert ceiling["des"] == pytest.approx(2 * 0.5 / 1.5)
    assert math.isnan(ceiling["pds"])  # no positive agreement: no ceiling
    assert ceiling["mae"] == pytest.approx(0.02)


def test_half_split_mae_is_twice_a_perfect_models_mae() -> None:
    """Normal cells around a known truth: the MAE of the full-depth mean from the truth (a
    perfect model's) is half the MAE between the two half-depth means."""
    rng = np.random.default_rng(0)
    truth = rng.uniform(0, 2, 20_000)
    cells = truth + rng.normal(0, 1, (100, truth.size))
    perfect = np.abs(cells.mean(0) - truth).mean()
    half_split = np.abs(cells[:50].mean(0) - cells[50:].mean(0)).mean()
    assert half_split / 2 == pytest.approx(perfect, rel=0.02)


def test_calibrated_score_arithmetic() -> None:
    assert calibrated_score(0.3, 0.1, 0.5) == pytest.approx(0.5)
    assert calibrated_score(0.05, 0.1, 0.5) == pytest.approx(-0.125)  # below the baseline
    assert calibrated_score(0.7, 0.1, 0.5) == pytest.approx(1.5)  # not clipped
    # An error metric: the ceiling is below the baseline, so less error scores above 0.
    assert calibrated_score(0.02, 0.03, 0.01) == pytest.approx(0.5)
    assert math.copysign(1, calibrated_score(0.03, 0.03, 0.01)) == 1  # 0, not -0
    assert math.isnan(calibrated_score(0.3, 0.5, 0.5))  # no room between baseline and ceiling
    assert math.isnan(calibrated_score(0.3, 0.1, math.nan))
    scores = calibrated_scores(
        {"des": 0.3, "pds": 0.8, "mae": 0.02},
        {"des": 0.1, "pds": 0.5, "mae": 0.03},
        {"des": 0.5, "pds": math.nan, "mae": 0.01},
    )
    assert math.isnan(scores["calibrated"]["pds"])
    assert scores["calibrated_mean"] == pytest.approx(0.5)  # NaN ignored
    nothing = calibrated_scores(*[{"des": 0.1, "pds": 0.5, "mae": 0.03}] * 3)
    assert math.isnan(nothing["calibrated_mean"])


def test_evaluate_adds_ceiling_and_calibrated_scores(tmp_path: Path) -> None:
    real, pred, perts = write_noisy_pair(tmp_path)
    genes = [f"GENE{i}" for i in range(150)]
    processed = write_processed(tmp_path / "processed.h5ad", genes, {p: genes for p in perts})
    ceiling = tmp_path / "ceiling_vcc2025.json"
    args = ["--real", str(real), "--threads", "1", "--vcc-group-size", "4"]
    assert main(["vcc-ceiling", *args, "--output", str(ceiling)]) == 0
    r = json.loads(ceiling.read_text())["ceiling"]
    common = [*args, "--pred", str(pred), "--processed", str(processed), "--ceiling", str(ceiling)]
    out = tmp_path / "eval"
    base_args = ["--outdir", str(out / "train_mean"), "--model-type", "train_mean"]
    assert main(["evaluate", *common, *base_args]) == 0
    base = json.loads((out / "train_mean" / "metrics.json").read_text())
    assert base["ceiling"] == r
    assert base["calibrated"] == {"des": 0.0, "pds": 0.0, "mae": 0.0}
    assert base["calibrated_mean"] == 0.0
    # Same real cells (same generator draws), predictions with half the noise.
    (tmp_path / "better").mkdir()
    _, better, _ = write_noisy_pair(tmp_path / "better", noise=0.2)
    common[common.index(str(pred))] = str(better)
    model_args = ["--outdir", str(out / "linear"), "--model-type", "linear"]
    baseline = ["--baseline-metrics", str(out / "train_mean" / "metrics.json")]
    assert main(["evaluate", *common, *model_args, *baseline]) == 0
    metrics = json.loads((out / "linear" / "metrics.json").read_text())
    b = metrics["baseline"]
    assert b == {name: base[name] for name in ("des", "pds", "mae")} != metrics["calibrated"]
    for name in ("des", "pds", "mae"):
        expected = (metrics[name] - b[name]) / (r[name] - b[name])
        assert metrics["calibrated"][name] == pytest.approx(expected)
    assert metrics["calibrated_mean"] == pytest.approx(
        np.mean(list(metrics["calibrated"].values()))
    )


def test_a_ceiling_of_other_cells_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ceiling_vcc2025.json"
    path.write_text(
        json.dumps(
            {
                "ceiling": {"des": 0.9, "pds": None, "mae": 0.01},
                "control_label": CONTROL,
                "per_perturbation": {"A": {}},
                "dropped_perturbations": ["B"],
            }
        )
    )
    values = read_ceiling(path, CONTROL, ["A", "B"])
    assert values["des"] == 0.9 and math.isnan(values["pds"])
    with pytest.raises(InputError, match="other perturbations"):
        read_ceiling(path, CONTROL, ["A", "C"])
    with pytest.raises(InputError, match="control_label"):
        read_ceiling(path, "ctrl", ["A", "B"])


def test_too_few_controls_are_refused(tmp_path: Path) -> None:
    x = np.log1p(np.arange(12, dtype=float).reshape(4, 3) / 7)
    real = write_cells(tmp_path / "real.h5ad", x, [CONTROL, "A", "A", "A"], ["g0", "g1", "g2"])
    with pytest.raises(InputError, match="1 'non-targeting' control cells"):
        vcc_ceiling(real, tmp_path / "c.json", EvalSettings(threads=1))
