"""Shared fixtures: small synthetic VCC data, its GEARS conversion, a workflow sandbox."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from scgpt_vcc.data.convert import convert_to_gears
from scgpt_vcc.data.synthetic import SyntheticSpec, write_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
VCC_GENES = REPO / "resources" / "reference" / "vcc_gene_names.csv"
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))

SMALL_SPEC = SyntheticSpec(
    n_cells=1200,
    n_genes=400,
    n_perturbations=12,
    n_validation_perturbations=4,
    seed=3,
    chunk_size=500,
)


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic dataset: adata.h5ad, validation.csv, genes.csv, truth.h5ad."""
    out = tmp_path_factory.mktemp("synthetic")
    write_synthetic_dataset(
        SMALL_SPEC,
        gene_list=VCC_GENES,
        adata_path=out / "adata.h5ad",
        validation_counts_path=out / "validation.csv",
        gene_names_path=out / "genes.csv",
        validation_truth_path=out / "truth.h5ad",
    )
    return out


@pytest.fixture(scope="session")
def converted_path(synthetic_dir: Path) -> Path:
    """The small synthetic dataset converted to GEARS format (default settings)."""
    out = synthetic_dir / "converted.h5ad"
    convert_to_gears(synthetic_dir / "adata.h5ad", out, chunk_size=500)
    return out


def copy_workflow(dest: Path) -> Path:
    """Copy what a workflow run needs (not results/) into ``dest``; return ``dest``."""
    for name in ("workflow", "config", "profiles"):
        if (REPO / name).exists():
            shutil.copytree(REPO / name, dest / name)
    shutil.copytree(REPO / "resources" / "reference", dest / "resources" / "reference")
    return dest


# Overrides of config/demo.yaml that keep workflow tests fast.
TINY_CONFIG = {
    "synthetic": {
        "enabled": True,
        "n_cells": 600,
        "n_genes": 300,
        "n_perturbations": 8,
        "n_validation_perturbations": 3,
    },
    # Two held-out perturbations are too few for cell-eval2 to calibrate (its baseline is
    # degenerate, a clear error); tests/test_evaluate_vcc2026.py and the demo run vcc2026.
    "evaluate": {"profiles": ["vcc2025"]},
}


def write_tiny_config(workdir: Path, **overrides: object) -> str:
    """Write config/tiny.yaml (demo settings, tiny sizes, ``overrides``); return its path."""
    settings = yaml.safe_load((workdir / "config" / "demo.yaml").read_text())
    for key, value in {**TINY_CONFIG, **overrides}.items():
        if isinstance(value, dict) and isinstance(settings.get(key), dict):
            settings[key] = {**settings[key], **value}
        else:
            settings[key] = value
    (workdir / "config" / "tiny.yaml").write_text(yaml.safe_dump(settings))
    return "config/tiny.yaml"


def run_snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run snakemake in ``workdir``; on failure show its output in the assertion."""
    # Rules call the `scgpt-vcc` CLI installed next to this interpreter.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        [SNAKEMAKE, "--cores", "2", *args], cwd=workdir, capture_output=True, text=True, env=env
    )
    if check:
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    return result


@pytest.fixture
def workflow_dir(tmp_path: Path) -> Path:
    """A private copy of the workflow, so tests never touch the user's results/."""
    return copy_workflow(tmp_path)
