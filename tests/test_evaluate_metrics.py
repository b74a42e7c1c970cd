"""The GEARS/scGPT metric set against hand-computed answers and against GEARS itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from scgpt_vcc.errors import InputError
from scgpt_vcc.evaluate.means import check_log1p, group_means
from scgpt_vcc.evaluate.metrics import gears_metrics, perturbation_metrics, read_de_genes
from scgpt_vcc.stats import pearson
from tests.eval_support import CONTROL, write_cells, write_processed

GENES = ["A", "B", "C", "D"]
# Control mean [1, 1, 1, 2]; real A mean [0, 2, 1, 3]; real B mean [2, 0, 1, 2].
REAL = (
    [[1, 0, 2, 2], [1, 2, 0, 2], [0, 1, 1, 2], [0, 3, 1, 4], [2, 0, 1, 2], [2, 0, 1, 2]],
    [CONTROL, CONTROL, "A", "A", "B", "B"],
)
# Predicted A mean [0, 2, 2, 3]; predicted B = the control mean [1, 1, 1, 2] (no change).
PRED = (
    [[1, 1, 1, 2], [0, 1, 2, 3], [0, 3, 2, 3], [1, 1, 1, 2]],
    [CONTROL, "A", "A", "B"],
)
RANKING = {"A": ["C", "D", "A", "B"], "B": ["B", "A", "C", "D"]}

# Worked by hand (docs/metrics.md has the formulas):
# A: pearson([0,2,1,3],[0,2,2,3]) = 4.5/sqrt(5*4.75); deltas [-1,1,0,1] vs [-1,1,1,1]:
#    2.5/sqrt(2.75*3); DE genes C, D: [1,3] vs [2,3] -> 1; their deltas [0,1] vs [1,1]:
#    constant prediction -> 0; mse 1/4; mse_de 1/2.
# B: pearson([2,0,1,2],[1,1,1,2]) = 0.75/sqrt(2.75*0.75); predicted change is 0 everywhere
#    -> pearson_delta 0; DE genes B, A: [0,2] vs [1,1] -> 0 and 0; mse 2/4; mse_de 2/2.
EXPECTED = {
    "A": {
        "pearson": 4.5 / np.sqrt(5 * 4.75),
        "pearson_delta": 2.5 / np.sqrt(2.75 * 3),
        "pearson_de": 1.0,
        "pearson_de_delta": 0.0,
        "mse": 0.25,
        "mse_de": 0.5,
    },
    "B": {
        "pearson": 0.75 / np.sqrt(2.75 * 0.75),
        "pearson_delta": 0.0,
        "pearson_de": 0.0,
        "pearson_de_delta": 0.0,
        "mse": 0.5,
        "mse_de": 1.0,
    },
}


@pytest.fixture()
def tiny(tmp_path: Path):
    real = write_cells(tmp_path / "real.h5ad", np.array(REAL[0], float), REAL[1], GENES)
    pred = write_cells(tmp_path / "pred.h5ad", np.array(PRED[0], float), PRED[1], GENES)
    processed = write_processed(tmp_path / "processed.h5ad", GENES, RANKING)
    return real, pred, processed


def test_hand_computed_example(tiny) -> None:
    real_path, pred_path, processed = tiny
    real = group_means(real_path, "target_gene", chunk_size=4)  # chunks split the groups
    pred = group_means(pred_path, "target_gene", chunk_size=3)
    np.testing.assert_allclose(real.row(CONTROL), [1, 1, 1, 2])
    assert list(real.n_cells) == [2, 2, 2]
    de = read_de_genes(processed, ["A", "B"], n_top=2)
    assert [list(de["A"]), list(de["B"])] == [["C", "D"], ["B", "A"]]
    table = gears_metrics(real, pred, CONTROL, de, ["A", "B"])
    for pert, expected in EXPECTED.items():
        for name, value in expected.items():
            assert table.loc[pert, name] == pytest.approx(value, abs=1e-12), (pert, name)
    assert table["pearson"].mean() == pytest.approx((0.9233805 + 0.5222330) / 2, abs=1e-6)


def test_missing_de_key_names_the_fix(tiny) -> None:
    _, _, processed = tiny
    with pytest.raises(InputError, match="has no DE genes"):
        read_de_genes(processed, ["ZZZ"])


def test_integer_predictions_are_refused(tmp_path: Path) -> None:
    path = write_cells(tmp_path / "counts.h5ad", np.array(REAL[0], float), REAL[1], GENES)
    with pytest.raises(InputError, match="only integers"):
        check_log1p(path, group_means(path, "target_gene"))


def test_matches_gears_compute_metrics() -> None:
    """GEARS's own compute_metrics (per-cell pairs) gives our pearson, mse and DE variants."""
    from gears.inference import compute_metrics

    rng = np.random.default_rng(1)
    truth = rng.gamma(1.0, 1.0, (30, 50))
    pred = truth + rng.normal(0, 0.5, truth.shape)
    pert = np.repeat(["X+ctrl", "Y+ctrl", "Z+ctrl"], 10)
    de_idx = {p: rng.choice(50, 20, replace=False) for p in np.unique(pert)}
    results = {
        "pert_cat": pert,
        "pred": pred,
        "truth": truth,
        "pred_de": np.stack([pred[i, de_idx[p]] for i, p in enumerate(pert)]),
        "truth_de": np.stack([truth[i, de_idx[p]] for i, p in enumerate(pert)]),
    }
    _, per_pert = compute_metrics(results)
    control = truth.mean(0) * 0.9
    for p in np.unique(pert):
        rows = pert == p
        ours = perturbation_metrics(truth[rows].mean(0), pred[rows].mean(0), control, de_idx[p])
        for name in ("pearson", "mse", "pearson_de", "mse_de"):
            assert ours[name] == pytest.approx(per_pert[p][name], rel=1e-9), (p, name)


def test_pearson_is_shared_and_says_what_undefined_means():
    """One Pearson for evaluation (undefined counts 0, as GEARS) and validation (nan)."""
    x = np.array([0.0, 2.0, 1.0, 3.0])
    y = np.array([0.0, 2.0, 2.0, 3.0])
    assert pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert pearson(x, np.ones(4)) == 0.0
    assert np.isnan(pearson(np.ones(4), x, undefined=np.nan))
