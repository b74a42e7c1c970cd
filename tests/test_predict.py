"""Prediction: baselines on hand-checkable data, scGPT over all genes, prediction files."""

from __future__ import annotations

import itertools
import logging
import pickle
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from cell_eval._baseline import _build_pert_baseline

from scgpt_vcc.data.pairing import read_pairing, write_pairing
from scgpt_vcc.model import load_pretrained, save_checkpoint, write_random_checkpoint
from scgpt_vcc.model.checkpoint import read_args, read_vocab
from scgpt_vcc.predict import run as predict_run
from scgpt_vcc.predict.baselines import (
    condition_means,
    fit_baseline,
    fit_linear,
    scgpt_perturbation_embedding,
    train_mean_vector,
)
from scgpt_vcc.predict.cells import ExpressionData
from scgpt_vcc.predict.population import match_mean
from scgpt_vcc.predict.run import (
    CPU_BATCH_SIZE,
    PredictSettings,
    build_model,
    predict_heldout,
    reference_for,
    write_real,
)
from scgpt_vcc.predict.scgpt import (
    PARTITION_BLOCK,
    RegressionMoments,
    chunk_bounds,
    load_predictor,
)
from tests.predict_support import heldout_split

torch.set_num_threads(1)


def _tiny_h5ad(path: Path, conditions: list[str], x: np.ndarray) -> Path:
    obs = pd.DataFrame(
        {"condition": pd.Categorical(conditions)}, index=[f"c{i}" for i in range(len(x))]
    )
    genes = [f"G{i}" for i in range(x.shape[1])]
    var = pd.DataFrame({"gene_name": genes}, index=genes)
    ad.AnnData(sp.csr_matrix(x.astype(np.float32)), obs=obs, var=var).write_h5ad(path)
    return path


def test_train_mean_is_cell_evals_baseline(tmp_path: Path) -> None:
    """The mean of the group means, control group included, as cell-eval builds it."""
    rng = np.random.default_rng(4)
    conds = ["ctrl"] * 5 + ["A+ctrl"] * 2 + ["B+ctrl"] * 7
    x = rng.gamma(1.0, 1.0, size=(len(conds), 6))
    data = ExpressionData(_tiny_h5ad(tmp_path / "t.h5ad", conds, x))
    model = fit_baseline("train_mean", data, ["A+ctrl", "B+ctrl", "ctrl"])
    labels = ["non-targeting" if c == "ctrl" else c.split("+")[0] for c in conds]
    reference = ad.AnnData(
        x.astype(np.float32), obs=pd.DataFrame({"target_gene": labels}, index=data.obs_names)
    )
    expected = _build_pert_baseline(reference, "target_gene", "non-targeting")
    np.testing.assert_allclose(model.vector, expected, rtol=1e-6)
    # Not the mean over perturbations only (the control group counts as one group).
    perturbation_only = (x[5:7].mean(axis=0) + x[7:].mean(axis=0)) / 2
    assert not np.allclose(model.vector, perturbation_only)


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


@pytest.mark.parametrize(
    ("n_others", "n_targets", "chunk_size"), [(998, 2, 100), (5, 1, 100), (0, 1, 4)]
)
def test_chunk_bounds_cover_every_gene_once_and_leave_room_for_the_targets(
    n_others: int, n_targets: int, chunk_size: int
) -> None:
    bounds = chunk_bounds(n_others, n_targets, chunk_size)
    assert bounds[0][0] == 0 and bounds[-1][1] == n_others
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    sizes = [hi - lo for lo, hi in bounds]
    assert max(sizes) + n_targets <= chunk_size and max(sizes) - min(sizes) <= 1
    assert len(bounds) == max(1, -(-n_others // (chunk_size - n_targets)))
    with pytest.raises(ValueError, match="no room"):
        chunk_bounds(n_others, chunk_size, chunk_size)


@pytest.fixture(scope="module")
def heldout(converted_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """perturb_processed.h5ad, pairing, a custom split with 3 test conditions, two models."""
    out = tmp_path_factory.mktemp("heldout")
    split = heldout_split(converted_path, out)
    genes = list(ExpressionData(split["data"]).genes)
    write_random_checkpoint(
        out / "pretrained", genes, vocab_fraction=0.9, embsize=16, nlayers=1, nheads=2, d_hid=16
    )
    model = load_pretrained(out / "pretrained")
    vocab = read_vocab(out / "pretrained" / "vocab.json")
    save_checkpoint(model, out / "finetuned", vocab, read_args(out / "pretrained" / "args.json"))
    return {**split, "pretrained": out / "pretrained", "finetuned": out / "finetuned", "out": out}


def test_scgpt_covers_all_genes_with_control_fallback_outside_vocab(heldout: dict) -> None:
    data = ExpressionData(heldout["data"])
    predictor = load_predictor(heldout["finetuned"], data.genes, chunk_size=64)
    match = predictor.match
    assert 0 < match.n_matched < data.n_genes
    target = data.genes[int(match.input_positions[5])]
    control = data.read(data.control_rows[:6])
    pred = predictor.cells(control, [target])
    assert pred.shape == control.shape
    outside = ~match.matched
    np.testing.assert_array_equal(pred[:, outside], control[:, outside])
    # Every in-vocabulary gene is predicted by the model, not copied from the control.
    changed = ~np.isclose(pred[:, match.matched], control[:, match.matched])
    assert changed.all(axis=0).mean() > 0.95
    # A target outside the vocabulary: the whole cell keeps the control values.
    oov_target = data.genes[int(np.flatnonzero(outside)[0])]
    np.testing.assert_array_equal(predictor.cells(control, [oov_target]), control)


def test_one_chunk_equals_full_length_forward(heldout: dict) -> None:
    data = ExpressionData(heldout["data"])
    predictor = load_predictor(heldout["finetuned"], data.genes, chunk_size=10**6)
    cols = predictor.input_columns
    target = data.genes[int(cols[3])]
    control = data.read(data.control_rows[:4])
    flags = torch.zeros(4, len(cols), dtype=torch.long)
    flags[:, 3] = 1
    with torch.inference_mode():
        full = predictor.model(
            predictor.input_ids.expand(4, -1), torch.from_numpy(control[:, cols]), flags
        ).numpy()
    np.testing.assert_allclose(
        predictor.cells(control, [target])[:, cols], full, rtol=1e-5, atol=1e-5
    )


def test_a_cells_prediction_does_not_depend_on_the_batch_or_other_perturbations(
    heldout: dict,
) -> None:
    """Partitions are drawn per block of cells of one target set: a memory setting (cells per
    call) and the other perturbations predicted leave each cell's prediction unchanged."""
    data = ExpressionData(heldout["data"])
    genes, rows = data.genes, data.control_rows[: PARTITION_BLOCK + 6]
    control = data.read(rows)
    cols = load_predictor(heldout["finetuned"], genes, chunk_size=64).input_columns
    a, b = genes[int(cols[2])], genes[int(cols[9])]
    whole = load_predictor(heldout["finetuned"], genes, chunk_size=64)
    expected = whole.cells(control, [a])
    split = load_predictor(heldout["finetuned"], genes, chunk_size=64)
    split.cells(control[:5], [b])  # another perturbation first
    parts = [split.cells(control[i:j], [a]) for i, j in [(0, 7), (7, 40), (40, len(rows))]]
    np.testing.assert_allclose(np.concatenate(parts), expected, rtol=1e-5, atol=1e-5)
    # Cells of the next block get another partition: their predictions differ.
    again = whole.cells(control, [a])
    assert not np.allclose(again[:, cols], expected[:, cols], atol=1e-6)


def test_a_call_out_of_gpu_memory_is_split_without_changing_a_prediction(
    heldout: dict, caplog: pytest.LogCaptureFixture
) -> None:
    data = ExpressionData(heldout["data"])
    control = data.read(data.control_rows[:10])
    plain = load_predictor(heldout["finetuned"], data.genes, chunk_size=64)
    target = data.genes[int(plain.input_columns[4])]
    expected = plain.cells(control, [target])
    small = load_predictor(heldout["finetuned"], data.genes, chunk_size=64)
    forward = small.model.forward

    def at_most_three_cells(ids: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        if ids.shape[0] > 3:  # what a GPU with room for three cells does
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return forward(ids, *args)

    small.model.forward = at_most_three_cells
    with caplog.at_level(logging.WARNING):
        np.testing.assert_allclose(small.cells(control, [target]), expected, rtol=1e-5, atol=1e-5)
    assert "CUDA out of memory with 10 cells per model call" in caplog.text
    assert "with 5 cells" in caplog.text and "with 2 cells" not in caplog.text


def test_cells_per_model_call_are_decided_by_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    unset, gpu_set = PredictSettings(), PredictSettings(gpu_batch_size=512)
    assert unset.for_model("scgpt_finetuned").batch_size == CPU_BATCH_SIZE  # this CPU
    monkeypatch.setattr(predict_run, "pick_device", lambda _: torch.device("cuda"))
    assert gpu_set.for_model("scgpt_finetuned").batch_size == 512
    assert gpu_set.for_model("scgpt_scratch").batch_size == 512
    assert gpu_set.for_model("train_mean").batch_size == CPU_BATCH_SIZE  # no model on a GPU
    assert PredictSettings(batch_size=16).for_model("scgpt_finetuned").batch_size == 16


def _check_format(path: Path, data: ExpressionData, expected: dict[str, int]) -> ad.AnnData:
    adata = ad.read_h5ad(path)
    assert isinstance(adata.X, sp.csr_matrix) and adata.X.dtype == np.float32
    assert list(adata.var_names) == data.genes
    assert adata.obs["target_gene"].value_counts().to_dict() == expected
    assert adata.X.data.min() >= 0 and adata.X.data.max() < 15
    return adata


def _pseudobulk(adata: ad.AnnData, label: str) -> np.ndarray:
    return np.asarray(adata[adata.obs["target_gene"] == label].X.mean(axis=0)).ravel()


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
    # control: each predicted cell starts from its paired control cell ...
    pairing = read_pairing(heldout["pairing"])
    perturbed = (control.obs["target_gene"] != "non-targeting").to_numpy()
    real_rows = [int(np.flatnonzero(data.obs_names == n)[0]) for n in real.obs_names[perturbed]]
    np.testing.assert_array_equal(
        control.obs["input_row"].to_numpy()[perturbed], pairing[real_rows]
    )
    # ... rescaled per gene so that the cells' mean is the mean of all control cells;
    # zeros stay zeros.
    all_controls = data.read(data.control_rows).mean(axis=0, dtype=np.float64)
    for gene in real_counts:
        group = (control.obs["target_gene"] == gene).to_numpy()
        inputs = data.read(control.obs["input_row"].to_numpy()[group])
        cells = control.X[group].toarray()
        np.testing.assert_allclose(cells.mean(axis=0), all_controls, atol=2e-6)
        scale = all_controls / np.where(inputs.mean(axis=0) > 0, inputs.mean(axis=0), 1)
        expressed = inputs.mean(axis=0) > 0
        np.testing.assert_allclose(cells[:, expressed], (inputs * scale)[:, expressed], rtol=1e-5)
        # Genes no input cell expresses: every cell at the control mean.
        np.testing.assert_allclose(
            cells[:, ~expressed], np.tile(all_controls[~expressed], (len(cells), 1)), atol=1e-6
        )
    # The same control cells in the prediction and the real file.
    np.testing.assert_array_equal(control.X[~perturbed].toarray(), real.X[~perturbed].toarray())

    fixed = PredictSettings(
        seed=1, chunk_size=64, batch_size=16, n_cells=7, n_control_cells=20, n_reference_cells=30
    )
    predict_heldout(
        "scgpt_finetuned", *args, out / "scgpt.h5ad", fixed, model_dir=heldout["finetuned"]
    )
    scgpt = _check_format(
        out / "scgpt.h5ad", data, {"non-targeting": 20, **dict.fromkeys(real_counts, 7)}
    )
    construction = scgpt.uns["scgpt_vcc_prediction"]["construction"]
    assert set(construction["redraw_deviation"]) == set(real_counts)
    assert 0 < construction["max_redraw_deviation"] < 1


def test_pseudobulk_is_the_models_population_mean(heldout: dict) -> None:
    """control: the mean of all controls; linear: c + b + G W p; scGPT: its estimate."""
    data = ExpressionData(heldout["data"])
    out = heldout["out"] / "population"
    split = {"train": [], "test": heldout["test"]}
    with (heldout["out"] / "split.pkl").open("rb") as fh:
        split["train"] = pickle.load(fh)["train"]
    # Few cells per perturbation, drawn from the controls: a sample mean would be noisy.
    settings = PredictSettings(seed=2, chunk_size=64, batch_size=16, n_cells=5)
    args = (heldout["data"], heldout["split"], heldout["pairing"])
    reference = reference_for(data, settings)
    np.testing.assert_allclose(reference.mean, data.read(data.control_rows).mean(axis=0), atol=1e-6)
    for model_type in ("control", "linear", "train_mean", "scgpt_finetuned"):
        folder = heldout["finetuned"] if model_type.startswith("scgpt") else None
        predict_heldout(model_type, *args, out / f"{model_type}.h5ad", settings, folder)
        written = ad.read_h5ad(out / f"{model_type}.h5ad")
        model = build_model(model_type, data, split["train"], settings, folder)
        for condition in heldout["test"]:
            targets = [condition.split("+")[0]]
            expected = np.maximum(model.population_mean(targets, reference).values, 0)
            np.testing.assert_allclose(_pseudobulk(written, targets[0]), expected, atol=2e-6)
    linear = fit_baseline("linear", data, split["train"])
    means = condition_means(data, [*[c for c in split["train"] if c != "ctrl"], "ctrl"])
    closed = fit_linear(
        data.genes, means[:-1], [c for c in split["train"] if c != "ctrl"], means[-1]
    )
    target = [heldout["test"][0].split("+")[0]]
    np.testing.assert_allclose(
        linear.population_mean(target, reference).values, means[-1] + closed.change(target)
    )


def test_control_mae_is_not_inflated_by_sampling(tmp_path: Path) -> None:
    """Truth = the control cells shifted by a known amount: MAE is exactly the shift's."""
    rng = np.random.default_rng(5)
    controls = rng.gamma(2.0, 0.5, size=(200, 8)) * (rng.random((200, 8)) > 0.3)
    shift = np.linspace(0.05, 0.4, 8)
    x = np.vstack([controls, controls + shift, controls[:50]])
    conds = ["ctrl"] * 200 + ["A+ctrl"] * 200 + ["B+ctrl"] * 50
    path = _tiny_h5ad(tmp_path / "shift.h5ad", conds, x)
    with (tmp_path / "split.pkl").open("wb") as fh:
        pickle.dump({"train": ["B+ctrl", "ctrl"], "val": [], "test": ["A+ctrl"]}, fh)
    write_pairing(path, tmp_path / "pairing.npz", 1)
    settings = PredictSettings(seed=1, n_cells=20, n_reference_cells=None)
    args = (path, tmp_path / "split.pkl", tmp_path / "pairing.npz")
    predict_heldout("control", *args, tmp_path / "control.h5ad", settings)
    write_real(*args, tmp_path / "real.h5ad", settings)
    predicted = _pseudobulk(ad.read_h5ad(tmp_path / "control.h5ad"), "A")
    truth = _pseudobulk(ad.read_h5ad(tmp_path / "real.h5ad"), "A")
    np.testing.assert_allclose(np.abs(predicted - truth).mean(), shift.mean(), atol=1e-6)


def test_match_mean_keeps_the_mean_and_the_zeros_when_clipping() -> None:
    rng = np.random.default_rng(6)
    cells = rng.normal(1.0, 1.0, size=(40, 5)) * (rng.random((40, 5)) > 0.3)
    cells[:, 4] = 0.0  # a gene the model never expresses in these cells
    mean = np.array([2.0, 0.5, 0.1, -0.3, 0.7])
    out, negative, filled = match_mean(cells, mean)
    assert out.min() >= 0 and negative == int((cells < 0).sum()) > 0
    np.testing.assert_allclose(out.mean(axis=0), np.maximum(mean, 0), atol=1e-6)
    positive = np.maximum(cells[:, :3], 0)
    np.testing.assert_array_equal(out[:, :3] == 0, positive == 0)  # zeros stay zeros
    factor = mean[:3] / positive.mean(axis=0)  # one factor per gene
    np.testing.assert_allclose(out[:, :3], positive * factor, rtol=1e-5)
    np.testing.assert_array_equal(out[:, 3], 0)  # a negative mean: every cell at 0
    assert filled == 1 and np.allclose(out[:, 4], 0.7)  # no expression: filled with the mean


def test_regression_estimator_is_exact_for_a_response_linear_in_the_input() -> None:
    rng = np.random.default_rng(7)
    population = rng.gamma(2.0, 1.0, size=(5000, 4))
    sample = population[rng.choice(5000, 100, replace=False)]
    moments = RegressionMoments(4)
    moments.add(sample, 0.7 * sample + 0.2)
    np.testing.assert_allclose(
        moments.regression_mean(population.mean(axis=0)), 0.7 * population.mean(axis=0) + 0.2
    )


def test_linear_with_external_perturbation_embedding() -> None:
    """Effects linear in an outside embedding of the target are recovered from it."""
    rng = np.random.default_rng(8)
    n_genes, k = 50, 3
    genes = [f"G{i}" for i in range(n_genes)]
    outside = {g: rng.normal(size=k) for g in genes}
    train = genes[:30]
    mean_train = np.mean([outside[g] for g in train], axis=0)
    outside = {g: v - mean_train for g, v in outside.items()}
    loadings = rng.normal(size=(n_genes, k))
    loadings -= loadings.mean(axis=0)  # G is a PCA of gene-centred profiles
    control = np.full(n_genes, 3.0)
    means = np.array([control + loadings @ outside[g] for g in train])
    model = fit_linear(
        genes, means, [f"{g}+ctrl" for g in train], control, pca_dim=k, ridge=1e-9,
        perturbation_embedding=outside,
    )  # fmt: skip
    for gene in genes[30:]:
        np.testing.assert_allclose(model.change([gene]), loadings @ outside[gene], atol=1e-5)


def test_scgpt_perturbation_embedding_projects_the_checkpoint_rows(heldout: dict) -> None:
    data = ExpressionData(heldout["data"])
    table = scgpt_perturbation_embedding(heldout["pretrained"], data.genes, 4)
    vocab = read_vocab(heldout["pretrained"] / "vocab.json")
    assert set(table) == {g for g in data.genes if g in vocab}
    rows = load_pretrained(heldout["pretrained"]).encoder.embedding.weight.detach().double().numpy()
    names = sorted(table)
    embedded = rows[[vocab[g] for g in names]]
    projected = np.array([table[g] for g in names])
    # PCA scores: centred, uncorrelated, and a linear function of the centred rows.
    np.testing.assert_allclose(projected.mean(axis=0), 0, atol=1e-8)
    gram = projected.T @ projected
    np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0, atol=1e-6)
    centred = embedded - embedded.mean(axis=0)
    solution, *_ = np.linalg.lstsq(centred, projected, rcond=None)
    np.testing.assert_allclose(centred @ solution, projected, atol=1e-6)


def test_linear_falls_back_to_train_mean_for_an_unmeasured_target(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Without a perturbation embedding (the target is not a measured gene) the linear
    model's prediction is train_mean's: b is the mean training change."""
    rng = np.random.default_rng(3)
    genes = [f"G{i}" for i in range(12)]
    means = rng.gamma(2.0, 1.0, size=(4, 12))  # G1, G2, G3 perturbed; the control last
    model = fit_linear(genes, means[:-1], ["G1+ctrl", "G2+ctrl", "G3+ctrl"], means[-1], 2, 0.1)
    change = model.change(["NOT_MEASURED"])
    np.testing.assert_allclose(means[-1] + change, train_mean_vector(means))
    assert "NOT_MEASURED has no perturbation embedding" in caplog.text
    assert "predicts train_mean's change" in caplog.text
    assert not np.allclose(model.change(["G1"]), change)  # a measured target is not
