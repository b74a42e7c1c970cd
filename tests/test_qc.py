"""Data QC: knockdown is measured on normalised counts, not on the log1p scale."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scgpt_vcc.data.de import compute_de, load_stats
from scgpt_vcc.data.qc import qc_report, write_qc
from scgpt_vcc.errors import InputError

GENES = ["G0", "G1", "G2"]


def _gears_h5ad(path: Path, perturbed: tuple[str, ...] = ("G1+ctrl",) * 4) -> Path:
    """4 control and 4 'G1+ctrl' cells; G1's normalised counts average 10 and 0.8."""
    conditions = ["ctrl"] * 4 + list(perturbed)
    counts = np.array(
        [[5.0, 8.0, 3.0], [7.0, 12.0, 2.0]] * 2 + [[5.0, 0.6, 3.0], [7.0, 1.0, 2.0]] * 2
    )
    obs = pd.DataFrame(
        {"condition": pd.Categorical(conditions), "cell_type": pd.Categorical(["K562"] * 8)},
        index=[f"c{i}" for i in range(8)],
    )
    x = sp.csr_matrix(np.log1p(counts).astype(np.float32))
    ad.AnnData(x, obs=obs, var=pd.DataFrame(index=GENES)).write_h5ad(path)
    return path


@pytest.fixture
def stats_and_vocab(tmp_path: Path) -> tuple[Path, Path]:
    converted = _gears_h5ad(tmp_path / "converted.h5ad")
    stats = tmp_path / "stats.npz"
    compute_de(converted, tmp_path / "processed.h5ad", stats, chunk_size=3)
    (tmp_path / "vocab.json").write_text(json.dumps({g: i for i, g in enumerate(GENES)}))
    return stats, tmp_path / "vocab.json"


def test_knockdown_is_on_normalised_counts(stats_and_vocab: tuple[Path, Path]) -> None:
    report = qc_report(*stats_and_vocab, min_cells=1)
    row = report["knockdown"]["G1+ctrl"]
    # 1 - 0.8 / 10 on counts; the ratio of log1p means would say ~0.76
    assert row["knockdown"] == pytest.approx(0.92, abs=1e-5)
    assert row["target_mean_normalized_counts_perturbed"] == pytest.approx(0.8, rel=1e-5)
    assert row["target_mean_normalized_counts_control"] == pytest.approx(10.0, rel=1e-5)
    log1p_perturbed = np.log1p([0.6, 1.0]).mean()
    assert row["target_mean_log1p_perturbed"] == pytest.approx(log1p_perturbed, rel=1e-5)
    assert row["target_mean_log1p_control"] == pytest.approx(np.log1p([8, 12]).mean(), rel=1e-5)


def test_stats_keep_means_on_both_scales(converted_path: Path, tmp_path: Path) -> None:
    compute_de(converted_path, tmp_path / "p.h5ad", tmp_path / "s.npz", chunk_size=97)
    stats = load_stats(tmp_path / "s.npz")
    adata = ad.read_h5ad(converted_path)
    x = adata.X.toarray().astype(np.float64)
    condition = adata.obs["condition"].astype(str).to_numpy()
    for row, cond in enumerate(stats["conditions"].tolist()):
        cells = x[condition == cond]
        np.testing.assert_allclose(stats["mean"][row], cells.mean(axis=0), rtol=1e-6)
        np.testing.assert_allclose(
            stats["mean_normalized_counts"][row], np.expm1(cells).mean(axis=0), rtol=1e-6
        )


def test_stats_from_an_older_compute_de_are_named(
    stats_and_vocab: tuple[Path, Path], tmp_path: Path
) -> None:
    stats_path, vocab = stats_and_vocab
    stats = load_stats(stats_path)
    del stats["mean_normalized_counts"]
    np.savez(tmp_path / "old.npz", **stats)
    with pytest.raises(InputError, match=r"old\.npz: mean_normalized_counts: is missing"):
        qc_report(tmp_path / "old.npz", vocab, min_cells=1)


def test_stats_without_contexts_are_one_context(
    stats_and_vocab: tuple[Path, Path], tmp_path: Path
) -> None:
    stats_path, vocab = stats_and_vocab
    stats = load_stats(stats_path)
    assert stats["contexts"].tolist() == ["K562", "K562"]
    del stats["contexts"]
    np.savez(tmp_path / "old.npz", **stats)
    report = qc_report(tmp_path / "old.npz", vocab, min_cells=1)
    assert report == qc_report(stats_path, vocab, min_cells=1)
    assert list(report["knockdown"]) == ["G1+ctrl"]
    assert report["cells_per_perturbation"] == {"G1+ctrl": 4}


def test_labels_that_are_no_gene_are_named_with_the_fix(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A target outside the measured genes may still be a gene the vocabulary knows
    (TP53); a label known to neither is a guide call to exclude at conversion."""
    perturbed = ("TP53+ctrl", "TP53+ctrl", "unassigned+ctrl", "unassigned+ctrl")
    converted = _gears_h5ad(tmp_path / "converted.h5ad", perturbed)
    stats = tmp_path / "stats.npz"
    compute_de(converted, tmp_path / "processed.h5ad", stats, chunk_size=3)
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps({g: i for i, g in enumerate([*GENES, "TP53"])}))
    write_qc(stats, vocab, tmp_path / "qc", min_cells=1)
    report = json.loads((tmp_path / "qc" / "qc.json").read_text())
    assert report["targets_not_measured"] == ["TP53", "unassigned"]
    assert report["labels_not_genes"] == ["unassigned"]
    assert "['unassigned']" in caplog.text and "convert.exclude_labels" in caplog.text
