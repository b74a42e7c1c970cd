"""The whole tiny demo runs end to end and ``snakemake --report`` shows every section."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import anndata as ad
import pytest

from scgpt_vcc.predict import MODEL_TYPES
from tests.conftest import run_snakemake, write_tiny_config


@pytest.mark.slow
def test_demo_end_to_end_and_report(workflow_dir: Path) -> None:
    config = write_tiny_config(workflow_dir, predict={"threads": 1})
    run_snakemake(workflow_dir, "--configfile", config)

    predictions = workflow_dir / "results/predictions/demo/seed1"
    real = ad.read_h5ad(predictions / "real.h5ad", backed="r")
    for model_type in MODEL_TYPES:
        pred = ad.read_h5ad(predictions / f"{model_type}.h5ad", backed="r")
        assert list(pred.var_names) == list(real.var_names)
        assert (
            pred.obs["target_gene"].value_counts().to_dict()
            == real.obs["target_gene"].value_counts().to_dict()
        )
        metrics = json.loads(
            (workflow_dir / f"results/eval/demo/seed1/{model_type}/metrics.json").read_text()
        )
        assert {"pearson", "pearson_delta", "des", "pds", "mae", "calibrated"} <= set(metrics)
    # The submission's model trained on every training perturbation, not on a seed's split.
    run_log = (workflow_dir / "results/models/demo/submission/scgpt_finetuned/run.log").read_text()
    assert "split demo_all_train_1_0.75.pkl" in run_log
    submission = workflow_dir / "results/submission/demo/scgpt_finetuned"
    assert json.loads((submission / "submission.json").read_text())["split"].endswith(
        "demo_all_train_1_0.75.pkl"
    )
    with tarfile.open(submission / "prediction.prep.vcc") as archive:
        assert "pred.h5ad.zst" in archive.getnames()
    score = json.loads((submission / "score.json").read_text())
    assert 0 <= score["challenge_score"] <= 100

    run_snakemake(workflow_dir, "--configfile", config, "--report", "report.html")
    html = (workflow_dir / "report.html").read_text()
    for section in ("Data QC", "Training", "Evaluation", "VCC submission"):
        assert section in html
    for name in (
        "cells_per_perturbation.png",
        "knockdown.png",
        "loss_curve.png",
        "summary.csv",
        "metrics.png",
        "per_perturbation.png",
        "change_scatter.png",
        "calibrated.png",
        "score.json",
    ):
        assert name in html, name
    # The rule graph: every rule of the run is a node of the embedded graph.
    rules = ("finetune", "finetune_submission", "predict_scgpt", "predict_baseline", "evaluate")
    rules += ("vcc2025_ceiling", "submission_scgpt", "score_submission", "summarize_eval")
    for rule in rules:
        assert f'"rule": "{rule}"' in html, rule
