"""A screen shaped like a real targeted CRISPR-knockout experiment, through the whole workflow.

A few hundred genes, several targets that the panel does not measure (but the scGPT
vocabulary knows), guide calls that name no gene (``unassigned``), a gene under an old
symbol that HGNC has renamed, a weak guide and cells without counts: the workflow runs on
it with config alone (no hand edits of the input) and writes a submission that lists
unmeasured targets.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import yaml

from scgpt_vcc.data.genes import read_gene_list, write_gene_list
from scgpt_vcc.data.synthetic import SyntheticSpec, write_synthetic_dataset
from scgpt_vcc.model.random_checkpoint import write_random_checkpoint
from tests.conftest import VCC_GENES, run_snakemake

N_UNMEASURED_TRAINING = 4  # of 10 training targets, the panel measures 6
OLD_SYMBOL = "OLDSYMBOL1"  # what the data call a gene the vocabulary knows as its new symbol


def _screen(folder: Path) -> dict:
    """Write the screen's inputs; return what the test checks against."""
    spec = SyntheticSpec(n_cells=900, n_genes=300, n_perturbations=10,
                         n_validation_perturbations=4, seed=5)  # fmt: skip
    paths = {k: folder / f for k, f in [("raw", "raw.h5ad"), ("counts", "validation.csv"),
                                         ("genes", "all_genes.csv")]}  # fmt: skip
    write_synthetic_dataset(spec, VCC_GENES, paths["raw"], paths["counts"], paths["genes"])
    adata = ad.read_h5ad(paths["raw"])
    all_genes = read_gene_list(paths["genes"])
    labels = adata.obs["target_gene"].astype(str).to_numpy()
    training = sorted(set(labels) - {"non-targeting"})
    validation = pd.read_csv(paths["counts"])["target_gene"].tolist()
    unmeasured = [*training[:N_UNMEASURED_TRAINING], validation[0]]
    # The vocabulary (a random whole-human-format checkpoint) knows every gene.
    write_random_checkpoint(folder / "scGPT_human", all_genes, vocab_fraction=1.0, embsize=32,
                            nlayers=2, nheads=4, d_hid=32, seed=1)  # fmt: skip
    # The panel: the unmeasured targets' columns go; one gene keeps an old symbol.
    panel = adata[:, [g not in unmeasured for g in adata.var_names]].copy()
    renamed = next(g for g in panel.var_names if g not in training + validation)
    panel.var_names = [OLD_SYMBOL if g == renamed else g for g in panel.var_names]
    rng = np.random.default_rng(0)
    labels = labels.astype(object)
    labels[rng.choice(len(labels), 40, replace=False)] = "unassigned"
    panel.obs["target_gene"] = pd.Categorical(labels)
    counts = panel.X.tolil()
    # A weak guide: its cells keep the control level of their target.
    weak_target = training[N_UNMEASURED_TRAINING]
    weak_guide = f"{weak_target}_P1P2_1"
    column = list(panel.var_names).index(weak_target)
    totals = np.asarray(panel.X.sum(axis=1)).ravel()
    controls = labels == "non-targeting"
    level = (panel.X[controls][:, column].toarray().ravel() / totals[controls]).mean()
    for row in np.flatnonzero(panel.obs["guide_id"].astype(str).to_numpy() == weak_guide):
        counts[row, column] = round(level * totals[row])
    empty = rng.choice(np.flatnonzero(labels != "unassigned"), 5, replace=False)
    counts[empty] = 0
    panel.X = counts.tocsr()
    panel.write_h5ad(folder / "screen.h5ad")
    write_gene_list(list(panel.var_names), folder / "gene_names.csv")
    (folder / "hgnc_complete_set.txt").write_text(
        f"hgnc_id\tsymbol\tprev_symbol\talias_symbol\nHGNC:1\t{renamed}\t{OLD_SYMBOL}\t\n"
    )
    return {"unmeasured": unmeasured, "renamed": renamed, "validation": validation,
            "n_unassigned": 40, "n_empty": len(empty), "weak_guide": weak_guide}  # fmt: skip


def _config(workdir: Path, inputs: Path) -> str:
    settings = yaml.safe_load((workdir / "config" / "demo.yaml").read_text())
    models = ["scgpt_finetuned", "train_mean", "linear"]
    settings.update(
        dataset="screen",
        raw_adata=str(inputs / "screen.h5ad"),
        pretrained_dir=str(inputs / "scGPT_human"),
        validation_counts=str(inputs / "validation.csv"),
        gene_names=str(inputs / "gene_names.csv"),
        hgnc_table=str(inputs / "hgnc_complete_set.txt"),
        synthetic={"enabled": False},
        convert={"exclude_labels": ["unassigned"]},
        gears={"write_cell_graphs": False},
        predict={**settings["predict"], "model_types": models, "n_reference_cells": 128},
        # Three held-out perturbations (31-121 cells) have too few DE genes for cell-eval2 to
        # calibrate the VCC 2026 suite (a clear error, tests/test_evaluate_vcc2026.py).
        evaluate={"model_types": models, "profiles": ["vcc2025"]},
    )
    (workdir / "config" / "screen.yaml").write_text(yaml.safe_dump(settings))
    return "config/screen.yaml"


@pytest.mark.slow
def test_a_knockout_screen_runs_to_a_submission_that_lists_unmeasured_targets(
    workflow_dir: Path, tmp_path: Path
) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    screen = _screen(inputs)
    run_snakemake(workflow_dir, "--configfile", _config(workflow_dir, inputs))

    results = workflow_dir / "results"
    converted = ad.read_h5ad(results / "gears/screen/converted.h5ad", backed="r")
    report = converted.uns["scgpt_vcc"]
    assert (report["n_excluded_cells"], report["n_empty_cells"]) == (screen["n_unassigned"], 5)
    assert "unassigned+ctrl" not in set(converted.obs["condition"].astype(str))

    qc = json.loads((results / "gears/screen/qc/qc.json").read_text())
    assert screen["weak_guide"] in qc["weak_guides"]
    knockdown = {g["guide"]: g["knockdown"] for g in qc["guides"]}
    assert knockdown[screen["weak_guide"]] < 0.3
    assert set(screen["unmeasured"][:-1]) <= set(qc["targets_not_measured"])

    match = json.loads((results / "gears/screen/vocab_match.json").read_text())
    assert match["renames"] == {OLD_SYMBOL: screen["renamed"]}
    assert match["n_matched"] == match["n_genes"]

    log = (results / "models/screen/submission/scgpt_finetuned/run.log").read_text()
    assert f"{N_UNMEASURED_TRAINING} perturbation targets are not measured" in log
    assert "1 genes matched under their current HGNC symbol" in log
    assert "their cells are skipped" not in log

    submission = results / "submission/screen/scgpt_finetuned"
    listed = json.loads((submission / "submission.json").read_text())["n_cells"]
    assert set(listed) == set(screen["validation"])
    cells = ad.read_h5ad(submission / "prediction.h5ad")
    unmeasured_target = screen["unmeasured"][-1]
    assert unmeasured_target not in set(cells.var_names)
    assert (cells.obs["target_gene"] == unmeasured_target).sum() == listed[unmeasured_target]
    with tarfile.open(submission / "prediction.prep.vcc") as archive:
        assert "pred.h5ad.zst" in archive.getnames()
    summary = (results / "eval/screen/summary.md").read_text()
    assert "scgpt_finetuned" in summary and "linear" in summary
