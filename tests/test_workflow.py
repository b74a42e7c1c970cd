"""The Snakemake workflow plans and runs its first stages (in a private copy)."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import pandas as pd
import pytest

from tests.conftest import run_snakemake, write_tiny_config


def _place_real_inputs(root: Path) -> None:
    for path in (
        "resources/vcc/adata_Training.h5ad",
        "resources/vcc/pert_counts_Validation.csv",
        "resources/scGPT_human/args.json",
        "resources/scGPT_human/vocab.json",
        "resources/scGPT_human/best_model.pt",
    ):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text("placeholder")


def test_dry_run_plans_demo_from_scratch(workflow_dir: Path) -> None:
    out = run_snakemake(workflow_dir, "-n", "--configfile", "config/demo.yaml").stdout
    for rule in ("make_synthetic_dataset", "make_synthetic_checkpoint", "convert_to_gears"):
        assert rule in out


def test_dry_run_plans_vcc_with_real_inputs_in_place(workflow_dir: Path) -> None:
    _place_real_inputs(workflow_dir)
    out = run_snakemake(workflow_dir, "-n", "--configfile", "config/vcc.yaml").stdout
    assert "convert_to_gears" in out
    assert "make_synthetic_dataset" not in out
    assert "resources/vcc/adata_Training.h5ad" in out


def test_missing_real_input_says_where_to_get_it(workflow_dir: Path) -> None:
    result = run_snakemake(workflow_dir, "-n", "--configfile", "config/vcc.yaml", check=False)
    assert result.returncode != 0
    message = result.stdout + result.stderr
    assert "raw_adata" in message and "Virtual Cell Challenge" in message


@pytest.mark.parametrize(
    ("override", "complaint"),
    [
        ("cell_type=K_562", "cell_type"),
        ("seeds=one", "seeds"),
        ("not_a_key=1", "not_a_key"),
    ],
)
def test_config_errors_stop_the_workflow(workflow_dir: Path, override: str, complaint: str) -> None:
    result = run_snakemake(workflow_dir, "-n", "--config", override, check=False)
    assert result.returncode != 0
    assert complaint in result.stdout + result.stderr


@pytest.mark.slow
def test_demo_inputs_and_conversion_run(workflow_dir: Path) -> None:
    run_snakemake(workflow_dir, "convert_to_gears", "--configfile", write_tiny_config(workflow_dir))
    converted = ad.read_h5ad(workflow_dir / "results/gears/demo/converted.h5ad")
    assert converted.shape == (600, 300)
    assert set(converted.obs["condition"]) >= {"ctrl"}
    assert (workflow_dir / "logs/demo/convert_to_gears.log").read_text()
    assert (workflow_dir / "benchmarks/demo/convert_to_gears.tsv").exists()


@pytest.mark.slow
@pytest.mark.parametrize("split", ["simulation_single", "custom"])
def test_every_evaluation_split_runs_end_to_end(workflow_dir: Path, split: str) -> None:
    """The schema's other splits (simulation runs in the demo tests) reach the summary."""
    config = write_tiny_config(workflow_dir)
    run_snakemake(workflow_dir, "resources/demo/adata_Training.h5ad", "--configfile", config)
    obs = ad.read_h5ad(workflow_dir / "resources/demo/adata_Training.h5ad", backed="r").obs
    targets = sorted(set(obs["target_gene"].astype(str)) - {"non-targeting"})
    held_out = [f"{t}+ctrl" for t in targets[:2]] if split == "custom" else []
    config = write_tiny_config(
        workflow_dir, gears={"split": split, "test_perts": held_out}, train={"epochs": 1}
    )
    run_snakemake(workflow_dir, "--configfile", config)
    table = pd.read_csv(workflow_dir / "results/eval/demo/seed1/linear/per_perturbation.csv")
    assert len(table) > 0
    if held_out:
        assert sorted(table["perturbation"]) == targets[:2]
    assert (workflow_dir / "results/eval/demo/summary.md").exists()
