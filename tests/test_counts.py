"""Predictions as raw integer counts (predict/counts.py): measured cells exact, predicted
cells sampled so that their depth-normalised pseudobulk is the prediction."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from scgpt_vcc.errors import InputError
from scgpt_vcc.io import CsrRowReader, read_uns
from scgpt_vcc.predict.counts import (
    MAX_CELL_TOTAL,
    CountDiagnostics,
    CountSettings,
    sample_counts,
    write_counts,
)
from scgpt_vcc.predict.run import PredictSettings, predict_heldout, write_real
from tests.predict_support import heldout_split


@pytest.fixture(scope="module")
def predictions(converted_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("counts")
    split = heldout_split(converted_path, out)
    args = (split["data"], split["split"], split["pairing"])
    settings = PredictSettings(seed=1)
    write_real(*args, out / "real.h5ad", settings)
    predict_heldout("train_mean", *args, out / "train_mean.h5ad", settings)
    return {"converted": converted_path, "out": out}


def _measured(converted: Path, rows: np.ndarray) -> np.ndarray:
    reader = CsrRowReader(converted, "layers/counts")
    try:
        return reader.read_csr(rows).toarray()
    finally:
        reader.close()


def test_real_cells_keep_their_measured_counts(predictions: dict) -> None:
    out = predictions["out"]
    write_counts(out / "real.h5ad", predictions["converted"], out / "real_counts.h5ad")
    counts = ad.read_h5ad(out / "real_counts.h5ad")
    real = ad.read_h5ad(out / "real.h5ad")
    assert list(counts.obs_names) == list(real.obs_names)
    assert counts.obs["target_gene"].equals(real.obs["target_gene"])
    expected = _measured(predictions["converted"], real.obs["input_row"].to_numpy())
    np.testing.assert_array_equal(counts.X.toarray(), expected)
    assert counts.uns["scgpt_vcc_counts"]["predicted_cells"] == 0


@pytest.mark.parametrize("sampling", ["round", "poisson"])
def test_predicted_counts_have_the_prediction_as_pseudobulk(predictions: dict, sampling) -> None:
    out, converted = predictions["out"], predictions["converted"]
    path = out / f"train_mean_{sampling}.h5ad"
    write_counts(out / "train_mean.h5ad", converted, path, CountSettings(sampling, seed=3))
    counts, pred = ad.read_h5ad(path), ad.read_h5ad(out / "train_mean.h5ad")
    x = counts.X.toarray()
    assert x.min() >= 0 and np.array_equal(x, np.round(x))  # non-negative integers
    assert x.sum(axis=1).max() <= MAX_CELL_TOTAL
    source = _measured(converted, pred.obs["input_row"].to_numpy())
    control = (pred.obs["condition"] == "ctrl").to_numpy()
    np.testing.assert_array_equal(x[control], source[control])  # real controls unchanged
    target_sum = read_uns(converted)["scgpt_vcc"]["target_sum"]
    scale = target_sum / source.sum(axis=1, keepdims=True)  # depth d of each input cell
    rate = np.expm1(pred.X.toarray().astype(np.float64)) / scale
    variance = rate if sampling == "poisson" else (rate % 1) * (1 - rate % 1)
    for label in pred.obs.loc[~control, "target_gene"].unique():
        cells = (pred.obs["target_gene"] == label).to_numpy()
        n = cells.sum()
        pseudobulk = (x[cells] * scale[cells]).mean(axis=0)
        expected = np.expm1(pred.X[cells].toarray().astype(np.float64)).mean(axis=0)
        error = np.sqrt((variance[cells] * scale[cells] ** 2).sum(axis=0)) / n
        z = np.abs(pseudobulk - expected) / np.maximum(error, 1e-9)
        assert z.max() < 6, (label, z.max())
        assert np.abs(pseudobulk - expected).sum() > 0  # sampled, not copied
    assert counts.uns["scgpt_vcc_counts"]["sampling"] == sampling
    assert counts.uns["scgpt_vcc_counts"]["predicted_cells"] == int((~control).sum())


def test_cell_totals_are_capped() -> None:
    rng = np.random.default_rng(0)
    # Expected totals of 2e6 are scaled down; totals of exactly the cap overshoot about
    # half the time when sampled and are thinned back to it.
    rate = np.concatenate([np.full((3, 4000), 500.0), np.tile(np.r_[249.75, 250.25], (20, 2000))])
    for sampling in ("round", "poisson"):
        diagnostics = CountDiagnostics()
        counts = sample_counts(rate, sampling, rng, diagnostics)
        assert counts.sum(axis=1).max() <= MAX_CELL_TOTAL and counts.min() >= 0
        assert diagnostics.scaled_cells == 3 and diagnostics.thinned_cells > 0
        np.testing.assert_allclose(counts.sum(axis=1), MAX_CELL_TOTAL, rtol=5e-3)  # 5 sd


def test_genes_follow_the_prediction_and_unknown_genes_are_refused(
    predictions: dict, tmp_path: Path
) -> None:
    """A submission holds the data's genes in its own order: measured counts follow it."""
    out, converted = predictions["out"], predictions["converted"]
    real = ad.read_h5ad(out / "real.h5ad")
    real[:, ::-1].copy().write_h5ad(tmp_path / "reversed.h5ad")
    write_counts(tmp_path / "reversed.h5ad", converted, tmp_path / "reversed_counts.h5ad")
    expected = _measured(converted, real.obs["input_row"].to_numpy())[:, ::-1]
    np.testing.assert_array_equal(
        ad.read_h5ad(tmp_path / "reversed_counts.h5ad").X.toarray(), expected
    )
    real.var_names = ["NOT_A_GENE", *real.var_names[1:]]
    real.write_h5ad(tmp_path / "renamed.h5ad")
    with pytest.raises(InputError, match="var_names: 1 are not genes.*NOT_A_GENE"):
        write_counts(tmp_path / "renamed.h5ad", converted, tmp_path / "c.h5ad")
    assert not (tmp_path / "c.h5ad").exists()
