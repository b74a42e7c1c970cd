"""Two cell contexts end to end: the workflow on a synthetic screen of two cell lines with
partly context-specific effects (``context_column: cell_line``) pairs, ranks, predicts and
scores every context on its own, and averages the scores."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from scgpt_vcc.data.gears import CONTEXT, CONTROL
from scgpt_vcc.data.pairing import read_pairing
from scgpt_vcc.evaluate.contexts import context_files, mean_over_contexts
from scgpt_vcc.evaluate.run import ALL_METRICS, EvalSettings, _evaluate
from tests.conftest import TINY_CONFIG, run_snakemake, write_tiny_config

CONTEXTS = ["K562", "RPE1"]
MODELS = ["scgpt_finetuned", "control", "train_mean", "linear"]


@pytest.fixture(scope="module")
def two_context_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.conftest import copy_workflow

    root = copy_workflow(tmp_path_factory.mktemp("contexts"))
    config = write_tiny_config(
        root,
        context_column="cell_line",
        synthetic={**TINY_CONFIG["synthetic"], "n_cells": 1200, "n_contexts": 2},
        predict={"model_types": MODELS},
        evaluate={**TINY_CONFIG["evaluate"], "model_types": MODELS},
        train={"epochs": 2},
    )
    run_snakemake(root, "--configfile", config)
    return root


@pytest.mark.slow
def test_each_cell_keeps_its_context_and_pairs_within_it(two_context_run: Path) -> None:
    gears = two_context_run / "results/gears/demo"
    raw = ad.read_h5ad(two_context_run / "resources/demo/adata_Training.h5ad", backed="r").obs
    processed = ad.read_h5ad(gears / "perturb_processed.h5ad", backed="r")
    obs = processed.obs
    assert sorted(set(obs[CONTEXT].astype(str))) == CONTEXTS
    assert (obs[CONTEXT].astype(str) == raw.loc[obs.index, "cell_line"].astype(str)).all()
    paired = read_pairing(gears / "data_pyg/pairing_seed1.npz", len(obs))
    context = obs[CONTEXT].astype(str).to_numpy()
    assert (obs["condition"].astype(str).to_numpy()[paired] == CONTROL).all()
    assert (context[paired] == context).all()
    # DE genes per context, each against its own controls.
    keys = set(processed.uns["rank_genes_groups_cov_all"])
    target = next(c for c in obs["condition"].astype(str) if c != CONTROL)
    assert {f"{c}_{target}_1+1" for c in CONTEXTS} <= keys


@pytest.mark.slow
def test_predictions_hold_every_context(two_context_run: Path) -> None:
    folder = two_context_run / "results/predictions/demo/seed1"
    real = ad.read_h5ad(folder / "real.h5ad", backed="r").obs
    processed = ad.read_h5ad(
        two_context_run / "results/gears/demo/perturb_processed.h5ad", backed="r"
    ).obs

    def pairs(obs: pd.DataFrame) -> set[tuple[str, str]]:
        return set(zip(obs[CONTEXT].astype(str), obs["target_gene"].astype(str), strict=True))

    # Every held-out perturbation is held out, and predicted, in both contexts.
    held_out = {t for _, t in pairs(real)}
    assert pairs(real) == {(c, t) for c in CONTEXTS for t in held_out}
    for model in ["real", *MODELS]:
        obs = ad.read_h5ad(folder / f"{model}.h5ad", backed="r").obs
        assert pairs(obs) == pairs(real), model
        # Predicted cells start from a control cell of their own context.
        source = processed[CONTEXT].astype(str).to_numpy()[obs["input_row"].to_numpy()]
        assert (source == obs[CONTEXT].astype(str).to_numpy()).all(), model
    # train_mean is fitted per context: its cells differ between the contexts.
    train_mean = ad.read_h5ad(folder / "train_mean.h5ad")
    target = next(t for t in train_mean.obs["target_gene"].astype(str) if t != "non-targeting")
    means = [
        np.asarray(
            train_mean[
                (train_mean.obs["target_gene"] == target) & (train_mean.obs[CONTEXT] == c)
            ].X.mean(axis=0)
        ).ravel()
        for c in CONTEXTS
    ]
    assert np.abs(means[0] - means[1]).max() > 0.05


@pytest.mark.slow
def test_scores_are_per_context_and_averaged(two_context_run: Path) -> None:
    """Each context's numbers are those of an evaluation of its cells alone; the model's
    numbers are their mean."""
    root = two_context_run
    eval_dir = root / "results/eval/demo/seed1"
    metrics = json.loads((eval_dir / "linear/metrics.json").read_text())
    assert sorted(metrics["contexts"]) == CONTEXTS
    for name in (*ALL_METRICS, "challenge_score", "calibrated_mean"):
        values = [metrics["contexts"][c][name] for c in CONTEXTS]
        assert metrics[name] == pytest.approx(mean_over_contexts(values)), name
    folder = root / "results/predictions/demo/seed1"
    paths = {"real": folder / "real.h5ad", "pred": folder / "linear.h5ad"}
    with context_files(paths, CONTEXTS, 1000) as files:
        alone = _evaluate(
            files["RPE1"]["real"],
            files["RPE1"]["pred"],
            root / "results/gears/demo/perturb_processed.h5ad",
            "linear",
            EvalSettings(),
            eval_dir / "train_mean/metrics.json",
            None,
            eval_dir / "ceiling_vcc2025.json",
            "RPE1",
        )
    for name in (*ALL_METRICS, "challenge_score"):
        assert metrics["contexts"]["RPE1"][name] == pytest.approx(alone.summary[name]), name
    table = pd.read_csv(eval_dir / "linear/per_perturbation.csv")
    assert sorted(set(table[CONTEXT])) == CONTEXTS
    assert metrics["n_perturbations"] == len(table)
    summary = (root / "results/eval/demo/summary.md").read_text()
    assert "## Per cell context" in summary
    assert "| linear | RPE1 | " in summary
    assert "summed over 2 cell contexts" in summary
    # A VCC submission has one context: none is made.
    assert not (root / "results/submission").exists()
