"""VCC submission: cell counts, gene order, scale, cap and a .vcc made by real cell-eval prep."""

from __future__ import annotations

import tarfile
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from cell_eval.utils import guess_is_lognorm

from scgpt_vcc.data.genes import read_gene_list, write_gene_list
from scgpt_vcc.errors import InputError
from scgpt_vcc.predict.cells import ExpressionData
from scgpt_vcc.predict.run import PredictSettings
from scgpt_vcc.submission import (
    SubmissionSettings,
    cap_cell_counts,
    make_submission,
    score_submission,
    write_submission_h5ad,
)

torch.set_num_threads(1)
FAST = PredictSettings(seed=1, batch_size=64)


def test_cap_keeps_counts_when_they_fit_and_scales_them_when_not() -> None:
    assert cap_cell_counts({"A": 10, "B": 20}, 500, 100, 10) == ({"A": 10, "B": 20}, 70)
    counts, controls = cap_cell_counts({"A": 100, "B": 300}, 500, 210, 10)
    assert controls == 10 and counts == {"A": 50, "B": 150}
    assert sum(counts.values()) + controls <= 210
    with pytest.raises(InputError):
        cap_cell_counts({"A": 5, "B": 5}, 500, 11, 10)


def test_submission_file_and_vcc(synthetic_dir: Path, converted_path: Path, tmp_path: Path) -> None:
    # Shuffled gene order: the submission must follow gene_names, not the data.
    genes = read_gene_list(synthetic_dir / "genes.csv")
    shuffled = [genes[i] for i in np.random.default_rng(0).permutation(len(genes))]
    write_gene_list(shuffled, tmp_path / "genes.csv")
    counts = pd.read_csv(synthetic_dir / "validation.csv")
    summary = make_submission(
        converted_path,
        synthetic_dir / "validation.csv",
        tmp_path / "genes.csv",
        tmp_path / "out",
        SubmissionSettings(model_type="linear", max_cells=100_000),
        FAST,
    )
    adata = ad.read_h5ad(tmp_path / "out" / "prediction.h5ad")
    data = ExpressionData(converted_path)
    expected = {"non-targeting": int(data.control_rows.size)}
    expected.update(zip(counts["target_gene"], counts["n_cells"].astype(int), strict=True))
    assert adata.obs["target_gene"].value_counts().to_dict() == expected
    assert list(adata.var_names) == shuffled
    assert adata.X.dtype == np.float32 and adata.X.data.max() < 15 and adata.X.data.min() >= 0
    assert guess_is_lognorm(adata)  # cell-eval keeps the values, no renormalisation
    # Control cells are the training controls on the converted.h5ad scale, genes reordered.
    columns = [data.genes.index(g) for g in shuffled]
    controls = (adata.obs["target_gene"] == "non-targeting").to_numpy()
    np.testing.assert_array_equal(
        adata.X[controls].toarray(), data.read(data.control_rows, np.array(columns))
    )
    vcc = tmp_path / "out" / "prediction.prep.vcc"
    assert summary["vcc_bytes"] == vcc.stat().st_size > 0
    with tarfile.open(vcc) as archive:
        assert {"pred.h5ad.zst", "watermark.txt"} <= set(archive.getnames())


def test_cap_is_respected(synthetic_dir: Path, converted_path: Path, tmp_path: Path) -> None:
    counts = pd.read_csv(synthetic_dir / "validation.csv")
    cap = int(counts["n_cells"].sum()) // 2 + 30
    write_submission_h5ad(
        converted_path,
        synthetic_dir / "validation.csv",
        synthetic_dir / "genes.csv",
        tmp_path / "capped.h5ad",
        SubmissionSettings(model_type="control", max_cells=cap, min_control_cells=30),
        FAST,
    )
    obs = ad.read_h5ad(tmp_path / "capped.h5ad", backed="r").obs
    assert len(obs) <= cap
    assert (obs["target_gene"] == "non-targeting").sum() == 30
    assert set(obs["target_gene"]) == {"non-targeting", *counts["target_gene"]}


@pytest.mark.slow
def test_demo_submission_gets_a_real_score(
    synthetic_dir: Path, converted_path: Path, tmp_path: Path
) -> None:
    settings = SubmissionSettings(model_type="linear")
    args = (converted_path, synthetic_dir / "validation.csv", synthetic_dir / "genes.csv")
    write_submission_h5ad(*args, tmp_path / "pred.h5ad", settings, FAST)
    result = score_submission(
        tmp_path / "pred.h5ad", synthetic_dir / "truth.h5ad", *args, tmp_path / "score.json",
        settings, FAST,
    )  # fmt: skip
    for key in ("des", "pds", "mae", "challenge_score"):
        assert np.isfinite(result[key])
    assert 0 <= result["challenge_score"] <= 100
    assert 0 < result["mae"] < 1
