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
from scgpt_vcc.data.synthetic import (
    CONTEXT_COLUMN,
    PlantedBiology,
    SyntheticSpec,
    context_labels,
    plant_biology,
    write_synthetic_dataset,
)
from tests.conftest import SMALL_SPEC, VCC_GENES


@pytest.fixture(scope="module")
def adata(synthetic_dir: Path) -> ad.AnnData:
    return ad.read_h5ad(synthetic_dir / "adata.h5ad")


CONTEXT_SPEC = SyntheticSpec(
    n_cells=1200,
    n_genes=300,
    n_perturbations=6,
    n_validation_perturbations=3,
    n_contexts=2,
    seed=1,
    chunk_size=500,
)


@pytest.fixture(scope="module")
def context_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PlantedBiology]:
    """A small dataset of two cell contexts, and its planted biology."""
    out = tmp_path_factory.mktemp("contexts")
    biology = write_synthetic_dataset(
        CONTEXT_SPEC,
        gene_list=VCC_GENES,
        adata_path=out / "adata.h5ad",
        validation_counts_path=out / "validation.csv",
        gene_names_path=out / "genes.csv",
        validation_truth_path=out / "truth.h5ad",
    )
    return out, biology


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


def test_single_context_writes_no_context_column(synthetic_dir: Path, adata: ad.AnnData) -> None:
    assert CONTEXT_COLUMN not in adata.obs
    assert CONTEXT_COLUMN not in ad.read_h5ad(synthetic_dir / "truth.h5ad").obs


def test_spec_rejects_too_few_cells_per_context() -> None:
    with pytest.raises(ValueError, match="every context"):
        SyntheticSpec(n_cells=1200, n_perturbations=20, n_contexts=60).check()


def _context_table(obs: pd.DataFrame) -> pd.DataFrame:
    """Cells per target (rows) and context (columns)."""
    assert isinstance(obs[CONTEXT_COLUMN].dtype, pd.CategoricalDtype)
    assert list(obs[CONTEXT_COLUMN].cat.categories) == ["K562", "RPE1"]
    return pd.crosstab(obs["target_gene"].astype(str), obs[CONTEXT_COLUMN])


def test_every_context_has_controls_and_every_perturbation(
    context_dir: tuple[Path, PlantedBiology],
) -> None:
    out, _ = context_dir
    adata = ad.read_h5ad(out / "adata.h5ad")
    table = _context_table(adata.obs)
    assert table.shape == (CONTEXT_SPEC.n_perturbations + 1, 2)
    assert (table > 0).all().all()
    control = table.loc["non-targeting"] / table.sum()
    assert np.allclose(control, CONTEXT_SPEC.control_fraction, atol=0.01)
    assert abs(table.sum()["K562"] - table.sum()["RPE1"]) <= 1

    counts = pd.read_csv(out / "validation.csv")
    assert list(counts["target_gene"]) == sorted(counts["target_gene"])
    assert len(counts) == CONTEXT_SPEC.n_validation_perturbations
    truth = _context_table(ad.read_h5ad(out / "truth.h5ad").obs)
    assert set(truth.index) == {*counts["target_gene"], "non-targeting"}
    assert (truth > 0).all().all()
    assert list(truth.loc[counts["target_gene"]].sum(axis=1)) == list(counts["n_cells"])
    assert list(truth.loc["non-targeting"]) == list(table.loc["non-targeting"])


def test_context_labels_are_cell_line_names() -> None:
    assert context_labels(6) == ["K562", "RPE1", "HepG2", "Jurkat", "line4", "line5"]


def _members(biology: PlantedBiology, modules: list[int]) -> np.ndarray:
    """Whether each gene belongs to any of ``modules``."""
    return biology.module_membership[modules].sum(axis=0) > 0


def test_planted_effects_are_partly_context_specific(
    context_dir: tuple[Path, PlantedBiology],
) -> None:
    _, biology = context_dir
    response = biology.context_module_response
    shared = response[0] == response[1]
    assert shared.sum() == len(shared) // 2
    assert biology.context_log_offsets.shape == (2, len(biology.genes))
    assert not np.allclose(*biology.context_log_offsets)

    n_differ, n_shared = 0, 0
    for target, modules in biology.target_modules.items():
        others = np.arange(len(biology.genes)) != biology.genes.index(target)
        specific = others & _members(biology, [m for m in modules if not shared[m]])
        only_shared = others & _members(biology, [m for m in modules if shared[m]]) & ~specific
        lfc = [biology.log_fold_change(target, context) for context in (0, 1)]
        differ = ~np.isclose(*lfc)
        assert differ[specific].all()
        assert not differ[~specific].any()
        n_differ += specific.sum()
        n_shared += only_shared.sum()
    assert n_differ > 0 and n_shared > 0


def test_context_specific_effects_show_in_expression(
    context_dir: tuple[Path, PlantedBiology],
) -> None:
    out, biology = context_dir
    adata = ad.read_h5ad(out / "adata.h5ad")
    logx = _log_norm(adata)
    targets = adata.obs["target_gene"].astype(str).to_numpy()
    contexts = adata.obs[CONTEXT_COLUMN].cat.codes.to_numpy()

    def delta(target: str, context: int) -> np.ndarray:
        """Mean log-normalised change of ``target``'s cells from their context's controls."""
        cells = logx[(targets == target) & (contexts == context)].mean(axis=0)
        return cells - logx[(targets == "non-targeting") & (contexts == context)].mean(axis=0)

    planted = {
        t: biology.log_fold_change(t, 1) - biology.log_fold_change(t, 0)
        for t in set(targets) - {"non-targeting"}
    }
    target = max(sorted(planted), key=lambda t: np.abs(planted[t]).sum())
    observed = delta(target, 1) - delta(target, 0)
    others = np.arange(len(biology.genes)) != biology.genes.index(target)
    differ = others & (np.abs(planted[target]) > 0.3)
    same = others & (planted[target] == 0)
    assert differ.sum() >= 3
    assert np.abs(observed[differ]).mean() > 2 * np.abs(observed[same]).mean()
    assert (np.sign(observed[differ]) == np.sign(planted[target][differ])).mean() >= 0.75
