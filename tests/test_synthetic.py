"""The synthetic VCC-shaped dataset: format, realism and planted biology."""

from __future__ import annotations

import itertools
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scgpt_vcc.data.genes import read_gene_list
from scgpt_vcc.data.synthetic import SyntheticSpec, plant_biology, write_synthetic_dataset
from tests.conftest import SMALL_SPEC, VCC_GENES


@pytest.fixture(scope="module")
def adata(synthetic_dir: Path) -> ad.AnnData:
    return ad.read_h5ad(synthetic_dir / "adata.h5ad")


def _log_norm(adata: ad.AnnData) -> np.ndarray:
    x = adata.X.toarray()
    total = x.sum(axis=1, keepdims=True)
    return np.log1p(x / total * np.median(total))


def test_counts_are_csr_float32_integers_with_vcc_sparsity(adata: ad.AnnData) -> None:
    assert isinstance(adata.X, sp.csr_matrix)
    assert adata.X.dtype == np.float32
    assert np.array_equal(adata.X.data, np.round(adata.X.data))
    assert (adata.X.data > 0).all()
    nonzero = adata.X.nnz / np.prod(adata.shape)
    assert 0.35 < nonzero < 0.52, nonzero  # the real data is ~43% non-zero
    median_umi = np.median(np.asarray(adata.X.sum(axis=1)).ravel())
    assert 0.7 * SMALL_SPEC.depth < median_umi < 1.4 * SMALL_SPEC.depth


def test_annotations_look_like_vcc(adata: ad.AnnData) -> None:
    assert adata.shape == (SMALL_SPEC.n_cells, SMALL_SPEC.n_genes)
    assert {"target_gene", "guide_id", "batch"} <= set(adata.obs.columns)
    assert "gene_id" in adata.var and adata.var["gene_id"].str.startswith("ENSG").all()
    control = (adata.obs["target_gene"] == "non-targeting").mean()
    assert control == pytest.approx(0.17, abs=0.01)
    assert adata.obs["target_gene"].nunique() == SMALL_SPEC.n_perturbations + 1
    assert adata.obs_names.is_unique and adata.var_names.is_unique
    # Real symbols in the real VCC order.
    vcc = read_gene_list(VCC_GENES)
    position = [vcc.index(g) for g in adata.var_names]
    assert position == sorted(position)


def test_gene_names_file_has_no_header_and_all_genes(
    synthetic_dir: Path, adata: ad.AnnData
) -> None:
    text = (synthetic_dir / "genes.csv").read_text()
    assert text.splitlines() == list(adata.var_names)
    assert not text.endswith("\n")


def test_validation_perturbations_are_held_out(synthetic_dir: Path, adata: ad.AnnData) -> None:
    counts = pd.read_csv(synthetic_dir / "validation.csv")
    assert list(counts.columns) == ["target_gene", "n_cells", "median_umi_per_cell"]
    assert len(counts) == SMALL_SPEC.n_validation_perturbations
    real = pd.read_csv(VCC_GENES.with_name("vcc_pert_counts_Validation.csv"))
    assert set(counts["target_gene"]) <= set(real["target_gene"])
    assert not set(counts["target_gene"]) & set(adata.obs["target_gene"])
    assert set(counts["target_gene"]) <= set(adata.var_names)

    truth = ad.read_h5ad(synthetic_dir / "truth.h5ad")
    assert list(truth.var_names) == list(adata.var_names)
    observed = truth.obs["target_gene"].value_counts()
    for gene, n_cells in zip(counts["target_gene"], counts["n_cells"], strict=True):
        assert observed[gene] == n_cells
    assert observed["non-targeting"] > 0


def test_knockdown_lowers_target_to_10_to_30_percent(adata: ad.AnnData) -> None:
    expr = np.expm1(_log_norm(adata))
    targets = adata.obs["target_gene"].astype(str).to_numpy()
    control = expr[targets == "non-targeting"].mean(axis=0)
    ratios = []
    for gene in set(targets) - {"non-targeting"}:
        j = adata.var_names.get_loc(gene)
        ratios.append(expr[targets == gene, j].mean() / control[j])
    # Planted 10-30%; allow sampling noise of small groups.
    assert 0.08 < np.median(ratios) < 0.35
    assert max(ratios) < 0.6


def test_planted_modules_make_related_perturbations_alike(synthetic_dir: Path) -> None:
    adata = ad.read_h5ad(synthetic_dir / "adata.h5ad")
    vcc = read_gene_list(VCC_GENES)
    validation = sorted(pd.read_csv(synthetic_dir / "validation.csv")["target_gene"])
    biology, train_targets = plant_biology(SMALL_SPEC, vcc, validation)
    assert biology.genes == list(adata.var_names)

    logx = _log_norm(adata)
    targets = adata.obs["target_gene"].astype(str).to_numpy()
    control = logx[targets == "non-targeting"].mean(axis=0)
    delta = {t: logx[targets == t].mean(axis=0) - control for t in train_targets}

    # Observed change follows the planted one.
    fits = [np.corrcoef(delta[t], biology.log_fold_change(t))[0, 1] for t in train_targets]
    assert np.median(fits) > 0.5

    shared, unrelated = [], []
    for a, b in itertools.combinations(train_targets, 2):
        others = [g for g in range(len(biology.genes)) if biology.genes[g] not in (a, b)]
        r = np.corrcoef(delta[a][others], delta[b][others])[0, 1]
        share = set(biology.target_modules[a]) & set(biology.target_modules[b])
        (shared if share else unrelated).append(r)
    assert shared and unrelated
    assert np.mean(shared) > np.mean(unrelated) + 0.2


def test_same_seed_same_data(tmp_path: Path, synthetic_dir: Path) -> None:
    write_synthetic_dataset(
        SMALL_SPEC, VCC_GENES, tmp_path / "a.h5ad", tmp_path / "v.csv", tmp_path / "g.csv"
    )
    first = ad.read_h5ad(synthetic_dir / "adata.h5ad")
    second = ad.read_h5ad(tmp_path / "a.h5ad")
    assert (first.X != second.X).nnz == 0
    pd.testing.assert_frame_equal(first.obs, second.obs)


def test_spec_rejects_more_targets_than_genes() -> None:
    with pytest.raises(ValueError, match="n_genes"):
        SyntheticSpec(n_genes=100, n_perturbations=95, n_validation_perturbations=10).check()
