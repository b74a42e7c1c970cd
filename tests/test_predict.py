"""Prediction: baselines on hand-checkable data, scGPT over all genes, prediction files."""

from __future__ import annotations

import pickle
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from scgpt_vcc.data.de import compute_de
from scgpt_vcc.data.pairing import read_pairing, write_pairing
from scgpt_vcc.model import load_model, save_checkpoint, write_random_checkpoint
from scgpt_vcc.model.checkpoint import read_args, read_vocab
from scgpt_vcc.predict.baselines import condition_means, fit_linear, train_mean_vector
from scgpt_vcc.predict.cells import ExpressionData
from scgpt_vcc.predict.run import PredictSettings, predict_heldout, write_real
from scgpt_vcc.predict.scgpt import gene_chunks, load_predictor

torch.set_num_threads(1)


def _tiny_h5ad(path: Path, conditions: list[str], x: np.ndarray) -> Path:
    obs = pd.DataFrame(
        {"condition": pd.Categorical(conditions)}, index=[f"c{i}" for i in range(len(x))]
    )
    genes = [f"G{i}" for i in range(x.shape[1])]
    var = pd.DataFrame({"gene_name": genes}, index=genes)
    ad.AnnData(sp.csr_matrix(x.astype(np.float32)), obs=obs, var=var).write_h5ad(path)
    return path


def test_train_mean_is_mean_of_perturbation_means(tmp_path: Path) -> None:
    x = np.array([[1, 0], [3, 0], [2, 2], [0, 4], [0, 4], [0, 1]], dtype=float)
    conds = ["ctrl", "ctrl", "A+ctrl", "B+ctrl", "B+ctrl", "B+ctrl"]
    data = ExpressionData(_tiny_h5ad(tmp_path / "t.h5ad", conds, x))
    means = condition_means(data, ["A+ctrl", "B+ctrl", "ctrl"], chunk_size=4)
    np.testing.assert_allclose(means, [[2, 2], [0, 3], [2, 0]])
    # Mean of the two perturbation means, not of the four perturbed cells ([0.5, 2.75]).
    np.testing.assert_allclose(train_mean_vector(means[:2]), [1.0, 2.5])


def test_linear_recovers_planted_linear_effect() -> None:
    """Effects planted in the model's own form (change_j = G W G[j]) are recovered exactly.

    With a flat control profile and gene factors centred over the genes and over the
    training targets, the training pseudobulks have rank ``n_factors`` after centring, the
    PCA embedding spans the factors and the mean training change ``b`` is zero.
    """
    rng = np.random.default_rng(0)
    n_genes, n_factors = 60, 3
    train, test = np.arange(20), np.arange(20, 25)
    factors = rng.normal(size=(n_genes, n_factors))
    factors[train] -= factors[train].mean(axis=0)
    rest = np.arange(20, n_genes)
    factors[rest] -= factors[rest].mean(axis=0)
    interaction = rng.normal(size=(n_factors, n_factors))
    control = np.full(n_genes, 2.0)
    genes = [f"G{i}" for i in range(n_genes)]
    # Perturbing gene j shifts expression by F A F[j]: linear in the gene's factors.
    effect = {j: factors @ interaction @ factors[j] for j in range(25)}
    means = np.array([control + effect[j] for j in train])
    model = fit_linear(
        genes, means, [f"G{j}+ctrl" for j in train], control, pca_dim=n_factors, ridge=1e-9
    )
    for j in test:
        np.testing.assert_allclose(model.change([f"G{j}"]), effect[j], atol=1e-5)
    # An unmeasured target has no embedding: the prediction is the mean training change.
    np.testing.assert_allclose(model.change(["NOT_A_GENE"]), model.center)


def test_gene_chunks_cover_every_gene_once_and_always_hold_the_target() -> None:
    targets = np.array([7, 130])
    chunks = gene_chunks(1000, targets, 100, np.random.default_rng(1))
    assert all(len(c) <= 100 and set(targets) <= set(c) for c in chunks)
    others = np.concatenate([np.setdiff1d(c, targets) for c in chunks])
    assert sorted(others) == sorted(set(range(1000)) - set(targets))
    assert len(chunks) == -(-998 // 98)


@pytest.fixture(scope="module")
def heldout(converted_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """perturb_processed.h5ad, pairing, a custom split with 3 test conditions, two models."""
    out = tmp_path_factory.mktemp("heldout")
    processed = out / "processed.h5ad"
    compute_de(converted_path, processed, out / "stats.npz", chunk_size=500)
    write_pairing(processed, out / "pairing.npz", 1)
    conditions = sorted(set(ad.read_h5ad(processed, backed="r").obs["condition"].astype(str)))
    perts = [c for c in conditions if c != "ctrl"]
    with (out / "split.pkl").open("wb") as fh:
        pickle.dump({"train": [*perts[3:], "ctrl"], "val": [], "test": perts[:3]}, fh)
    genes = list(ExpressionData(processed).genes)
    write_random_checkpoint(
        out / "pretrained", genes, vocab_fraction=0.9, embsize=16, nlayers=1, nheads=2, d_hid=16
    )
    model = load_model(out / "pretrained")
    vocab = read_vocab(out / "pretrained" / "vocab.json")
    save_checkpoint(model, out / "finetuned", vocab, read_args(out / "pretrained" / "args.json"))
    return {
        "data": processed,
        "pairing": out / "pairing.npz",
        "split": out / "split.pkl",
        "pretrained": out / "pretrained",
        "finetuned": out / "finetuned",
        "test": perts[:3],
        "out": out,
    }


def test_scgpt_covers_all_genes_with_control_fallback_outside_vocab(heldout: dict) -> None:
    data = ExpressionData(heldout["data"])
    predictor = load_predictor(heldout["finetuned"], data.genes, finetuned=True, chunk_size=64)
    match = predictor.match
    assert 0 < match.n_matched < data.n_genes
    target = data.genes[int(match.input_positions[5])]
    control = data.read(data.control_rows[:6])
    pred = predictor(control, [target])
    assert pred.shape == control.shape
    outside = ~match.matched
    np.testing.assert_array_equal(pred[:, outside], control[:, outside])
    # Every in-vocabulary gene is predicted by the model, not copied from the control.
    changed = ~np.isclose(pred[:, match.matched], control[:, match.matched])
    assert changed.all(axis=0).mean() > 0.95
    # A target outside the vocabulary: the whole cell keeps the control values.
    oov_target = data.genes[int(np.flatnonzero(outside)[0])]
    np.testing.assert_array_equal(predictor(control, [oov_target]), control)


def test_one_chunk_equals_full_length_forward(heldout: dict) -> None:
    data = ExpressionData(heldout["data"])
    predictor = load_predictor(heldout["finetuned"], data.genes, finetuned=True, chunk_size=10**6)
    cols = predictor.input_columns
    target = data.genes[int(cols[3])]
    control = data.read(data.control_rows[:4])
    flags = torch.zeros(4, len(cols), dtype=torch.long)
    flags[:, 3] = 1
    with torch.inference_mode():
        full = predictor.model(
            predictor.input_ids.expand(4, -1), torch.from_numpy(control[:, cols]), flags
        ).numpy()
    np.testing.assert_allclose(predictor(control, [target])[:, cols], full, rtol=1e-5, atol=1e-5)


def _check_format(path: Path, data: ExpressionData, expected: dict[str, int]) -> ad.AnnData:
    adata = ad.read_h5ad(path)
    assert isinstance(adata.X, sp.csr_matrix) and adata.X.dtype == np.float32
    assert list(adata.var_names) == data.genes
    assert adata.obs["target_gene"].value_counts().to_dict() == expected
    assert adata.X.data.min() >= 0 and adata.X.data.max() < 15
    return adata


def test_prediction_files(heldout: dict) -> None:
    data = ExpressionData(heldout["data"])
    out = heldout["out"] / "predictions"
    settings = PredictSettings(seed=1, chunk_size=64, batch_size=16)
    args = (heldout["data"], heldout["split"], heldout["pairing"])
    real_counts = {c.split("+")[0]: int((data.condition == c).sum()) for c in heldout["test"]}
    expected = {"non-targeting": int(data.control_rows.size), **real_counts}

    write_real(*args, out / "real.h5ad", settings)
    real = _check_format(out / "real.h5ad", data, expected)
    predict_heldout("control", *args, out / "control.h5ad", settings)
    control = _check_format(out / "control.h5ad", data, expected)
    # control: each predicted cell is its paired control cell, unchanged.
    pairing = read_pairing(heldout["pairing"])
    perturbed = (control.obs["target_gene"] != "non-targeting").to_numpy()
    real_rows = [int(np.flatnonzero(data.obs_names == n)[0]) for n in real.obs_names[perturbed]]
    np.testing.assert_array_equal(
        control.obs["input_row"].to_numpy()[perturbed], pairing[real_rows]
    )
    np.testing.assert_array_equal(control.X[perturbed].toarray(), data.read(pairing[real_rows]))
    # The same control cells in the prediction and the real file.
    np.testing.assert_array_equal(control.X[~perturbed].toarray(), real.X[~perturbed].toarray())

    fixed = PredictSettings(seed=1, chunk_size=64, batch_size=16, n_cells=7, n_control_cells=20)
    predict_heldout(
        "scgpt_pretrained", *args, out / "pre.h5ad", fixed, model_dir=heldout["pretrained"]
    )
    _check_format(out / "pre.h5ad", data, {"non-targeting": 20, **dict.fromkeys(real_counts, 7)})
