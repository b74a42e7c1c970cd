"""Knockdown per guide and the optional filter of failed knockdowns (cell-load's rule)."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scgpt_vcc.data.convert import convert_to_gears
from scgpt_vcc.data.de import compute_de
from scgpt_vcc.data.qc import write_qc

GENES = ["A", "B", "C", "D"]


def _screen(path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """Every cell has 100 counts. Controls: 20 counts of A and of B. Perturbation A: guide
    A_1 leaves 2 (residual 0.1) in 30 cells, 18 (0.9: escaped) in 4; perturbation B's only
    guide leaves 16 (0.8: failed); perturbation Z targets an unmeasured gene."""
    rows, labels, guides = [], [], []

    def add(n: int, a: int, b: int, label: str, guide: str) -> None:
        for _ in range(n):
            rows.append([a, b, 50, 100 - 50 - a - b])
            labels.append(label)
            guides.append(guide)

    add(40, 20, 20, "non-targeting", "NT_1")
    add(30, 2, 20, "A", "A_1")
    add(4, 18, 20, "A", "A_1")
    add(35, 20, 16, "B", "B_1")
    add(32, 20, 20, "Z", "Z_1")
    obs = pd.DataFrame(
        {"target_gene": labels, "guide_id": guides}, index=[f"c{i}" for i in range(len(rows))]
    )
    x = sp.csr_matrix(np.array(rows, dtype=np.float32))
    ad.AnnData(x, obs=obs, var=pd.DataFrame(index=GENES)).write_h5ad(path)
    return path, {"labels": np.array(labels)}


def test_knockdown_per_guide_is_measured_and_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    raw, _ = _screen(tmp_path / "raw.h5ad")
    summary = convert_to_gears(raw, tmp_path / "converted.h5ad", chunk_size=16)
    assert summary.n_knockdown_filtered_cells == 0 and summary.n_cells == 141  # filter off
    guides = ad.read_h5ad(tmp_path / "converted.h5ad").uns["scgpt_vcc_guides"]
    table = guides.set_index("guide")
    assert table.loc["A_1", "n_cells"] == 34 and table.loc["A_1", "target"] == "A"
    assert table.loc["A_1", "knockdown"] == pytest.approx(1 - (30 * 0.1 + 4 * 0.9) / 34)
    assert table.loc["B_1", "knockdown"] == pytest.approx(0.2)
    assert np.isnan(table.loc["Z_1", "knockdown"]) and np.isnan(table.loc["NT_1", "knockdown"])

    compute_de(tmp_path / "converted.h5ad", tmp_path / "p.h5ad", tmp_path / "s.npz", chunk_size=50)
    (tmp_path / "vocab.json").write_text(json.dumps({g: i for i, g in enumerate(GENES)}))
    write_qc(tmp_path / "s.npz", tmp_path / "vocab.json", tmp_path / "qc", 1,
             converted=tmp_path / "converted.h5ad")  # fmt: skip
    report = json.loads((tmp_path / "qc" / "qc.json").read_text())
    assert report["weak_guides"] == ["B_1"]
    assert report["knockdown_filter"] == {"enabled": False}
    assert {g["guide"] for g in report["guides"]} == {"NT_1", "A_1", "B_1", "Z_1"}
    assert "1 guides knock their target down by less than 70%: B_1 (20%)" in caplog.text


def test_the_knockdown_filter_removes_failed_guides_and_escaped_cells(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    raw, screen = _screen(tmp_path / "raw.h5ad")
    summary = convert_to_gears(
        raw, tmp_path / "converted.h5ad", chunk_size=16,
        max_perturbation_residual=0.3, max_cell_residual=0.5, knockdown_min_cells=30,
    )  # fmt: skip
    out = ad.read_h5ad(tmp_path / "converted.h5ad")
    conditions = out.obs["condition"].astype(str).value_counts().to_dict()
    # B failed (residual 0.8); A keeps its 30 knocked-down cells, not the 4 escapers; Z (no
    # readable knockdown) and the controls are untouched.
    assert conditions == {"ctrl": 40, "A+ctrl": 30, "Z+ctrl": 32}
    assert summary.n_knockdown_filtered_cells == 35 + 4
    report = json.loads(out.uns["scgpt_vcc"]["knockdown_filter"])
    assert report["perturbations_not_knocked_down"] == {"B": pytest.approx(0.8)}
    assert report["cells_escaped"] == 4 and report["perturbations_below_min_cells"] == []
    assert "1 perturbations not knocked down" in caplog.text
    # What is kept is exactly the kept cells converted on their own.
    keep = np.flatnonzero(np.isin(screen["labels"], ["non-targeting", "A", "Z"]))
    keep = keep[~((screen["labels"][keep] == "A") & (np.arange(141)[keep] >= 70))]
    assert list(out.obs_names) == [f"c{i}" for i in keep]

    # The cell rule alone removes B's cells too (all at 0.8); A, left with 30 cells, goes
    # when knockdown_min_cells asks for 31.
    stricter = convert_to_gears(raw, tmp_path / "strict.h5ad", max_cell_residual=0.5,
                                knockdown_min_cells=31)  # fmt: skip
    kept = ad.read_h5ad(tmp_path / "strict.h5ad").obs["condition"].astype(str)
    assert set(kept) == {"ctrl", "Z+ctrl"}
    assert stricter.n_knockdown_filtered_cells == 4 + 35 + 30
    report = json.loads(ad.read_h5ad(tmp_path / "strict.h5ad").uns["scgpt_vcc"]["knockdown_filter"])
    assert report["cells_escaped"] == 39 and report["perturbations_below_min_cells"] == ["A", "B"]
