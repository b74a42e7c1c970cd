"""VCC -> GEARS conversion: mapping, normalisation, streaming, errors, atomicity."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

from scgpt_vcc.cli import main
from scgpt_vcc.data import convert
from scgpt_vcc.data.convert import convert_to_gears, gears_conditions
from scgpt_vcc.errors import InputError


@pytest.fixture(scope="module")
def raw(synthetic_dir: Path) -> ad.AnnData:
    return ad.read_h5ad(synthetic_dir / "adata.h5ad")


@pytest.fixture(scope="module")
def converted(converted_path: Path) -> ad.AnnData:
    return ad.read_h5ad(converted_path)


def test_condition_mapping() -> None:
    targets = pd.Series(["TP53", "non-targeting", "MYC"])
    assert list(gears_conditions(targets, "non-targeting")) == ["TP53+ctrl", "ctrl", "MYC+ctrl"]


def test_gears_annotations(raw: ad.AnnData, converted: ad.AnnData) -> None:
    obs = converted.obs
    expected = np.where(
        raw.obs["target_gene"] == "non-targeting",
        "ctrl",
        raw.obs["target_gene"].astype(str) + "+ctrl",
    )
    assert list(obs["condition"]) == list(expected)
    assert set(obs["cell_type"]) == {"K562"}
    assert converted.uns["scgpt_vcc"]["cell_type"] == "K562"
    assert converted.uns["scgpt_vcc"]["context_column"] is None
    for kept in ("target_gene", "guide_id", "batch"):
        assert list(obs[kept]) == list(raw.obs[kept])
    assert list(converted.var["gene_name"]) == list(raw.var_names)
    assert list(converted.var["gene_id"]) == list(raw.var["gene_id"])
    assert list(converted.obs_names) == list(raw.obs_names)


def test_counts_kept_and_x_log_normalised_like_scanpy(
    raw: ad.AnnData, converted: ad.AnnData
) -> None:
    assert isinstance(converted.X, sp.csr_matrix) and converted.X.dtype == np.float32
    assert isinstance(converted.layers["counts"], sp.csr_matrix)
    assert (converted.layers["counts"] != raw.X).nnz == 0

    info = converted.uns["scgpt_vcc"]
    totals = np.asarray(raw.X.sum(axis=1)).ravel()
    assert info["target_sum"] == pytest.approx(np.median(totals))
    reference = raw.copy()
    sc.pp.normalize_total(reference, target_sum=info["target_sum"])
    sc.pp.log1p(reference)
    np.testing.assert_allclose(converted.X.toarray(), reference.X.toarray(), atol=1e-5)


def test_result_does_not_depend_on_chunk_size(synthetic_dir: Path, tmp_path: Path) -> None:
    convert_to_gears(synthetic_dir / "adata.h5ad", tmp_path / "a.h5ad", chunk_size=7)
    convert_to_gears(synthetic_dir / "adata.h5ad", tmp_path / "b.h5ad", chunk_size=100_000)
    a, b = ad.read_h5ad(tmp_path / "a.h5ad"), ad.read_h5ad(tmp_path / "b.h5ad")
    assert (a.X != b.X).nnz == 0
    pd.testing.assert_frame_equal(a.obs, b.obs)


def test_explicit_target_sum_and_options(synthetic_dir: Path, tmp_path: Path) -> None:
    raw = ad.read_h5ad(synthetic_dir / "adata.h5ad")
    raw.obs = raw.obs.rename(columns={"target_gene": "gene"})
    raw.obs["gene"] = raw.obs["gene"].astype(str).replace("non-targeting", "NTC")
    raw.write_h5ad(tmp_path / "renamed.h5ad")
    summary = convert_to_gears(
        tmp_path / "renamed.h5ad",
        tmp_path / "out.h5ad",
        cell_type="H1",
        control_label="NTC",
        perturbation_column="gene",
        target_sum=1e4,
    )
    out = ad.read_h5ad(tmp_path / "out.h5ad")
    assert summary.target_sum == 1e4 and out.uns["scgpt_vcc"]["target_sum"] == 1e4
    assert set(out.obs["cell_type"]) == {"H1"}
    assert (out.obs["condition"] == "ctrl").sum() == (raw.obs["gene"] == "NTC").sum()
    row = np.expm1(out.X[0].toarray()).sum()
    assert row == pytest.approx(1e4, rel=1e-4)


def _write(tmp_path: Path, x: np.ndarray, **obs_columns: list[str]) -> Path:
    n_cells, n_genes = x.shape
    obs = pd.DataFrame(
        obs_columns or {"target_gene": ["non-targeting", "A"] * (n_cells // 2)},
        index=[f"c{i}" for i in range(n_cells)],
    )
    path = tmp_path / "bad.h5ad"
    ad.AnnData(
        sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=[f"G{j}" for j in range(n_genes)])
    ).write_h5ad(path)
    return path


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (np.nan, "NaN or inf"),
        (-1.0, "negative"),
        (0.5, "non-integer"),
    ],
)
def test_x_that_is_not_counts_is_refused(tmp_path: Path, values: float, message: str) -> None:
    x = np.ones((4, 3), dtype=np.float32)
    x[2, 1] = values
    with pytest.raises(InputError, match=message) as err:
        convert_to_gears(_write(tmp_path, x), tmp_path / "out.h5ad")
    assert "bad.h5ad" in str(err.value) and "Fix:" in str(err.value)
    assert not (tmp_path / "out.h5ad").exists()


def test_missing_column_and_missing_controls(tmp_path: Path) -> None:
    x = np.ones((4, 3), dtype=np.float32)
    path = _write(tmp_path, x, perturbation=["A", "B", "A", "B"])
    with pytest.raises(InputError, match="perturbation_column"):
        convert_to_gears(path, tmp_path / "out.h5ad")
    with pytest.raises(InputError, match="control_label"):
        convert_to_gears(path, tmp_path / "out.h5ad", perturbation_column="perturbation")
    with pytest.raises(InputError, match="underscore|'_'"):
        convert_to_gears(path, tmp_path / "out.h5ad", cell_type="K_562")


@pytest.mark.parametrize("missing", [np.nan, None, "", "  "], ids=["nan", "none", "empty", "blank"])
def test_missing_labels_are_refused(tmp_path: Path, missing: object) -> None:
    labels = ["non-targeting", "A", missing, "A", missing, "non-targeting"]
    path = _write(tmp_path, np.ones((6, 3), dtype=np.float32), target_gene=labels)
    with pytest.raises(InputError, match=r"obs\['target_gene'\]: 2 cells have no label") as err:
        convert_to_gears(path, tmp_path / "out.h5ad")
    assert "bad.h5ad" in str(err.value) and "convert.drop_missing_labels: true" in str(err.value)
    assert not (tmp_path / "out.h5ad").exists()


def _with_missing_labels() -> tuple[ad.AnnData, np.ndarray]:
    """14 cells, 6 of them unlabelled, rows 4-7 all unlabelled (one whole chunk of 4)."""
    nt = "non-targeting"
    labels = [nt, np.nan, "G2", nt, None, "", " ", np.nan, nt, "G1", "G2", nt, "", "G1"]
    missing = np.array([1, 4, 5, 6, 7, 12])
    counts = np.random.default_rng(0).poisson(3.0, size=(14, 4)).astype(np.float32)
    obs = pd.DataFrame({"target_gene": labels}, index=[f"c{i}" for i in range(14)])
    adata = ad.AnnData(
        sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=["G0", "G1", "G2", "G3"])
    )
    return adata, np.setdiff1d(np.arange(14), missing)


def test_cells_without_label_can_be_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    adata, kept = _with_missing_labels()
    adata.write_h5ad(tmp_path / "in.h5ad")
    adata[kept].write_h5ad(tmp_path / "labelled.h5ad")
    summary = convert_to_gears(
        tmp_path / "in.h5ad", tmp_path / "out.h5ad", chunk_size=4, drop_missing_labels=True
    )
    assert "dropping 6 cells with no label in obs['target_gene']" in caplog.text
    out = ad.read_h5ad(tmp_path / "out.h5ad")
    assert list(out.obs_names) == [f"c{i}" for i in kept]
    expected = ["ctrl", "G2+ctrl", "ctrl", "ctrl", "G1+ctrl", "G2+ctrl", "ctrl", "G1+ctrl"]
    assert list(out.obs["condition"]) == expected
    assert "nan+ctrl" not in set(out.obs["condition"].cat.categories)
    assert (summary.n_cells, summary.n_control_cells, summary.n_perturbations) == (8, 4, 2)
    np.testing.assert_array_equal(out.layers["counts"].toarray(), adata.X[kept].toarray())
    # the same as converting a file of the labelled cells only (target_sum included)
    reference_summary = convert_to_gears(tmp_path / "labelled.h5ad", tmp_path / "ref.h5ad")
    reference = ad.read_h5ad(tmp_path / "ref.h5ad")
    assert replace(summary, n_unlabelled_cells=0) == reference_summary
    assert summary.n_unlabelled_cells == 6
    assert (out.X != reference.X).nnz == 0
    pd.testing.assert_frame_equal(out.obs, reference.obs, check_categorical=False)


def test_cli_parses_drop_missing_labels(tmp_path: Path) -> None:
    adata, kept = _with_missing_labels()
    adata.write_h5ad(tmp_path / "in.h5ad")
    args = ["convert-to-gears", str(tmp_path / "in.h5ad"), str(tmp_path / "out.h5ad")]
    assert main([*args, "--drop-missing-labels", "False"]) == 2  # as cli_options renders False
    assert not (tmp_path / "out.h5ad").exists()
    assert main([*args, "--drop-missing-labels", "True"]) == 0
    assert ad.read_h5ad(tmp_path / "out.h5ad").n_obs == len(kept)


def test_excluded_labels_and_empty_cells_are_left_out_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Guide calls that name no gene (exclude_labels) and cells without a count leave the
    data with a logged count; what remains equals a file of the kept cells converted."""
    caplog.set_level(logging.INFO, logger="scgpt_vcc")
    nt = "non-targeting"
    labels = [nt, "G1", "unassigned", nt, "multiplet", "G1", "unassigned", nt, "G2", nt]
    counts = np.random.default_rng(1).poisson(3.0, size=(10, 4)).astype(np.float32) + 1
    counts[[3, 5]] = 0  # a control and a G1 cell without counts
    obs = pd.DataFrame({"target_gene": labels}, index=[f"c{i}" for i in range(10)])
    adata = ad.AnnData(
        sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=["G0", "G1", "G2", "G3"])
    )
    adata.write_h5ad(tmp_path / "in.h5ad")
    kept = [0, 1, 7, 8, 9]
    adata[kept].write_h5ad(tmp_path / "kept.h5ad")
    summary = convert_to_gears(
        tmp_path / "in.h5ad", tmp_path / "out.h5ad", chunk_size=3,
        exclude_labels=["unassigned", "multiplet", "doublet"],
    )  # fmt: skip
    assert "leaving out 2 cells labelled 'unassigned' (exclude_labels)" in caplog.text
    assert "leaving out 1 cells labelled 'multiplet'" in caplog.text
    assert "no cell is labelled 'doublet'" in caplog.text
    assert "leaving out 2 cells with no counts" in caplog.text
    assert (summary.n_excluded_cells, summary.n_empty_cells, summary.n_cells) == (3, 2, 5)
    out = ad.read_h5ad(tmp_path / "out.h5ad")
    assert list(out.obs_names) == [f"c{i}" for i in kept]
    assert np.isfinite(out.X.toarray()).all()
    assert out.uns["scgpt_vcc"]["n_excluded_cells"] == 3
    reference = convert_to_gears(tmp_path / "kept.h5ad", tmp_path / "ref.h5ad")
    assert replace(summary, n_excluded_cells=0, n_empty_cells=0) == reference
    assert (out.X != ad.read_h5ad(tmp_path / "ref.h5ad").X).nnz == 0
    # through the CLI, as the workflow passes a list
    args = ["convert-to-gears", str(tmp_path / "in.h5ad"), str(tmp_path / "cli.h5ad")]
    assert main([*args, "--exclude-labels", "unassigned", "multiplet"]) == 0
    assert ad.read_h5ad(tmp_path / "cli.h5ad").n_obs == 5


def test_excluding_the_control_label_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, np.ones((4, 3), dtype=np.float32))
    with pytest.raises(InputError, match="convert.exclude_labels: lists the control label"):
        convert_to_gears(path, tmp_path / "out.h5ad", exclude_labels=["non-targeting"])
    assert not (tmp_path / "out.h5ad").exists()


def test_interrupted_conversion_leaves_no_output(
    synthetic_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    real = convert.log_normalize

    def fail_on_second_chunk(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(convert, "log_normalize", fail_on_second_chunk)
    with pytest.raises(OSError, match="No space"):
        convert_to_gears(synthetic_dir / "adata.h5ad", tmp_path / "out.h5ad", chunk_size=500)
    assert list(tmp_path.iterdir()) == []


def _tiny(n_cells: int = 4, n_genes: int = 3) -> ad.AnnData:
    x = np.arange(1, n_cells * n_genes + 1, dtype=np.float32).reshape(n_cells, n_genes)
    obs = pd.DataFrame(
        {"target_gene": ["non-targeting", "G1"] * (n_cells // 2)},
        index=[f"c{i}" for i in range(n_cells)],
    )
    return ad.AnnData(sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=["G0", "G1", "G2"]))


@pytest.mark.parametrize(
    "make_x",
    [
        lambda x: x.toarray(),  # dense
        lambda x: x.astype(np.float64),
        lambda x: x.astype(np.int32),
    ],
    ids=["dense", "float64", "int32"],
)
def test_valid_count_layouts_are_accepted(tmp_path: Path, make_x) -> None:  # type: ignore[no-untyped-def]
    adata = _tiny()
    expected = adata.X.toarray()
    adata.X = make_x(adata.X)
    adata.write_h5ad(tmp_path / "in.h5ad")
    convert_to_gears(tmp_path / "in.h5ad", tmp_path / "out.h5ad")
    out = ad.read_h5ad(tmp_path / "out.h5ad")
    assert isinstance(out.X, sp.csr_matrix) and out.X.dtype == np.float32
    np.testing.assert_array_equal(out.layers["counts"].toarray(), expected)


def test_ensembl_ids_use_symbol_column_or_are_refused(tmp_path: Path) -> None:
    adata = _tiny()
    adata.var_names = ["ENSG00000000001", "ENSG00000000002", "ENSG00000000003"]
    adata.write_h5ad(tmp_path / "no_symbols.h5ad")
    with pytest.raises(InputError, match="Ensembl"):
        convert_to_gears(tmp_path / "no_symbols.h5ad", tmp_path / "out.h5ad")

    adata.var["gene_symbols"] = ["G0", "G1", "G2"]
    adata.write_h5ad(tmp_path / "symbols.h5ad")
    convert_to_gears(tmp_path / "symbols.h5ad", tmp_path / "out.h5ad")
    out = ad.read_h5ad(tmp_path / "out.h5ad")
    assert list(out.var_names) == ["G0", "G1", "G2"] == list(out.var["gene_name"])
    assert out.var["gene_id"].iloc[0] == "ENSG00000000001"


def test_duplicate_genes_and_barcodes_are_refused(tmp_path: Path) -> None:
    adata = _tiny()
    adata.var_names = ["G0", "G1", "G1"]
    adata.write_h5ad(tmp_path / "genes.h5ad")
    with pytest.raises(InputError, match=r"var\.index.*duplicated gene names \['G1'\]"):
        convert_to_gears(tmp_path / "genes.h5ad", tmp_path / "out.h5ad")
    adata = _tiny()
    adata.obs_names = ["c0", "c1", "c1", "c3"]
    adata.write_h5ad(tmp_path / "cells.h5ad")
    with pytest.raises(InputError, match=r"obs\.index.*duplicated cell barcodes"):
        convert_to_gears(tmp_path / "cells.h5ad", tmp_path / "out.h5ad")


def test_missing_and_truncated_inputs_are_named(tmp_path: Path, synthetic_dir: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        convert_to_gears(tmp_path / "absent.h5ad", tmp_path / "out.h5ad")
    data = (synthetic_dir / "adata.h5ad").read_bytes()
    (tmp_path / "truncated.h5ad").write_bytes(data[: len(data) // 3])
    with pytest.raises(InputError, match="truncated.h5ad.*truncated or corrupt"):
        convert_to_gears(tmp_path / "truncated.h5ad", tmp_path / "out.h5ad")
    assert not (tmp_path / "out.h5ad").exists()
