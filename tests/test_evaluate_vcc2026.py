"""The VCC 2026 suite through cell-eval2 (evaluate/vcc2026.py) on generated count data: a
replicate of the experiment scores near 1, a prediction of no effect near or below 0."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scgpt_vcc.errors import InputError
from scgpt_vcc.evaluate.vcc2026 import (
    build_reference,
    collect_vcc2026,
    score_vcc2026,
    vcc2026_markdown,
)
from tests.eval_support import CONTROL

N_GENES, N_PERTS, N_CELLS, N_CONTROLS = 400, 8, 60, 300


def _counts(path: Path, seed: int, effects: dict[str, np.ndarray], base: np.ndarray) -> Path:
    rng = np.random.default_rng(seed)
    labels = [CONTROL] * N_CONTROLS + [p for p in effects for _ in range(N_CELLS)]
    profile = np.stack([base * effects.get(label, 1.0) for label in labels])
    depth = rng.lognormal(np.log(3000), 0.3, len(labels))[:, None]
    x = rng.poisson(profile / profile.sum(axis=1, keepdims=True) * depth)
    obs = pd.DataFrame(
        {"target_gene": pd.Categorical(labels)}, index=[f"c{i}" for i in range(len(labels))]
    )
    genes = [f"G{i}" for i in range(N_GENES)]
    ad.AnnData(
        sp.csr_matrix(x.astype(np.float32)), obs=obs, var=pd.DataFrame(index=genes)
    ).write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("vcc2026")
    rng = np.random.default_rng(0)
    base = rng.gamma(0.6, 2.0, N_GENES) + 0.05
    effects = {}
    for p in range(N_PERTS):
        effect = np.ones(N_GENES)
        changed = rng.choice(N_GENES, 40, replace=False)
        effect[changed] = rng.choice([0.25, 4.0], 40)
        effect[p] = 0.1  # the knockdown of the target itself
        effects[f"G{p}"] = effect
    real = _counts(out / "real.h5ad", 1, effects, base)
    replicate = _counts(out / "replicate.h5ad", 2, effects, base)
    no_effect = _counts(out / "no_effect.h5ad", 3, {p: np.ones(N_GENES) for p in effects}, base)
    build_reference(real, out / "reference")
    results = {
        name: score_vcc2026(path, real, out / "reference", out / "seed1" / name, name)
        for name, path in (("replicate", replicate), ("no_effect", no_effect))
    }
    return {"out": out, "real": real, **results}


def test_a_replicate_scores_near_one_and_no_effect_near_zero(scored: dict) -> None:
    replicate, no_effect = scored["replicate"], scored["no_effect"]
    assert 0.7 < replicate["score"] < 1.3
    assert no_effect["score"] < 0.3 < replicate["score"] - no_effect["score"]
    assert replicate["contexts"] == {"cell_type": replicate["score"]}
    assert replicate["n_perturbations"] == N_PERTS


def test_each_score_is_calibrated_between_baseline_and_replicate(scored: dict) -> None:
    members = scored["replicate"]["metrics"]
    assert set(members) == {
        "pds_cosine",
        "expr_mse_unbiased_capped_norm",
        "de_wilcoxon_lfc_nmae",
        "de_wilcoxon_direction_fidelity_yield_raw",
        "de_wilcoxon_direction_reach_raw",
        "de_wilcoxon_sig_jaccard",
    }
    for name, m in members.items():
        expected = (m["value"] - m["baseline"]) / (m["replicate"] - m["baseline"])
        assert m["score"] == pytest.approx(expected, rel=1e-9), name
    mean = np.mean([m["score"] for m in members.values()])
    assert scored["replicate"]["score"] == pytest.approx(mean, rel=1e-9)
    written = json.loads(
        (scored["out"] / "seed1" / "replicate" / "metrics_vcc2026.json").read_text()
    )
    assert written["score"] == scored["replicate"]["score"]
    table = pd.read_csv(
        scored["out"] / "seed1" / "replicate" / "per_perturbation_vcc2026.csv", index_col=0
    )
    assert sorted(table.index) == sorted(f"G{p}" for p in range(N_PERTS))
    # expr_mse_unbiased_capped_norm is defined on the aggregate only.
    assert list(table.columns) == [m for m in members if m != "expr_mse_unbiased_capped_norm"]


def test_fractional_counts_are_refused(scored: dict, tmp_path: Path) -> None:
    adata = ad.read_h5ad(scored["out"] / "replicate.h5ad")
    adata.X = adata.X * 0.5
    adata.write_h5ad(tmp_path / "half.h5ad")
    with pytest.raises(InputError, match="half.h5ad.*refused by cell-eval2 run.*fractional"):
        score_vcc2026(tmp_path / "half.h5ad", scored["real"], scored["out"] / "reference",
                      tmp_path / "out", "half")  # fmt: skip
    assert not (tmp_path / "out" / "metrics_vcc2026.json").exists()


def test_summary_lists_the_calibrated_scores(scored: dict) -> None:
    frame = collect_vcc2026(scored["out"], [1], ["replicate", "no_effect"])
    assert set(frame["model_type"]) == {"replicate", "no_effect"}
    text = "\n".join(vcc2026_markdown(frame))
    assert "| replicate | " + f"{scored['replicate']['score']:.3f}" in text
    assert "b / r" in text


def test_too_few_perturbations_to_calibrate_say_so(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    base = rng.gamma(0.6, 2.0, N_GENES) + 0.05
    effects = {f"G{p}": np.where(np.arange(N_GENES) == p, 0.1, 1.0) for p in range(2)}
    real = _counts(tmp_path / "real.h5ad", 1, effects, base)
    with pytest.raises(InputError, match="degenerate.*hold out more perturbations"):
        build_reference(real, tmp_path / "reference")
    assert not (tmp_path / "reference").exists()


def _two_contexts(path: Path, first: Path, second: Path) -> Path:
    """``first``'s cells as context K562 and ``second``'s as RPE1, in one file."""
    parts = [ad.read_h5ad(p) for p in (first, second)]
    for part, context in zip(parts, ("K562", "RPE1"), strict=True):
        part.obs["cell_type"] = context
        part.obs_names = [f"{context}-{name}" for name in part.obs_names]
    ad.concat(parts).write_h5ad(path)
    return path


def test_each_context_is_scored_on_its_own_and_averaged(scored: dict, tmp_path: Path) -> None:
    """K562 holds the cells scored above; RPE1 an experiment with other effects. Each
    context scores as its cells alone do, and the file's score is the mean of the two."""
    out, rng = scored["out"], np.random.default_rng(9)
    base = rng.gamma(0.6, 2.0, N_GENES) + 0.05
    effects = {}
    for p in range(N_PERTS):
        effect = np.ones(N_GENES)
        effect[rng.choice(N_GENES, 40, replace=False)] = rng.choice([0.25, 4.0], 40)
        effect[p] = 0.1
        effects[f"G{p}"] = effect
    rpe1_real = _counts(tmp_path / "rpe1_real.h5ad", 11, effects, base)
    rpe1_replicate = _counts(tmp_path / "rpe1_replicate.h5ad", 12, effects, base)
    real = _two_contexts(tmp_path / "real.h5ad", scored["real"], rpe1_real)
    replicate = _two_contexts(tmp_path / "replicate.h5ad", out / "replicate.h5ad", rpe1_replicate)
    build_reference(real, tmp_path / "reference")
    assert sorted(p.name for p in (tmp_path / "reference").iterdir()) == ["K562", "RPE1"]
    result = score_vcc2026(replicate, real, tmp_path / "reference", tmp_path / "eval", "rep")
    alone = score_vcc2026(
        rpe1_replicate, rpe1_real, tmp_path / "reference" / "RPE1", tmp_path / "alone", "rep"
    )
    assert result["contexts"]["K562"] == pytest.approx(scored["replicate"]["score"], rel=1e-9)
    assert result["contexts"]["RPE1"] == pytest.approx(alone["score"], rel=1e-9)
    assert result["score"] == pytest.approx(np.mean(list(result["contexts"].values())))
    for name, member in result["metrics"].items():
        expected = np.mean([scored["replicate"]["metrics"][name]["score"],
                            alone["metrics"][name]["score"]])  # fmt: skip
        assert member["score"] == pytest.approx(expected, rel=1e-9), name
    table = pd.read_csv(tmp_path / "eval" / "per_perturbation_vcc2026.csv")
    assert sorted(set(table["cell_type"])) == ["K562", "RPE1"]
    assert len(table) == 2 * N_PERTS
