"""Dry runs and reruns: what Snakemake plans with each profile and after each kind of change.

Expected rerun sets come from Snakemake itself: ``--forcerun RULE`` on an unchanged finished run
plans RULE and everything downstream of it, which is exactly what a change to RULE must rerun.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import copy_workflow, run_snakemake, write_tiny_config
from tests.dag_support import plan

REPO = Path(__file__).resolve().parents[1]


def rules(jobs) -> list[str]:
    return sorted(job.rule for job in jobs)


@pytest.mark.parametrize("profile", ["local", "slurm"])
def test_dry_run_plans_full_dag_with_a_reason_per_job(tmp_path: Path, profile: str) -> None:
    workdir = copy_workflow(tmp_path)
    config = write_tiny_config(workdir)
    without_profile = plan(workdir, "--configfile", config)
    jobs = plan(workdir, "--profile", f"profiles/{profile}", "--configfile", config)
    assert rules(jobs) == rules(without_profile)
    assert {"make_synthetic_dataset", "convert_to_gears", "compute_de"} <= set(rules(jobs))
    for job in jobs:
        assert job.reason, f"{job.rule} has no reason"


def test_profile_gpu_type_must_match_the_gpu_class(tmp_path: Path) -> None:
    workdir = copy_workflow(tmp_path)
    config = write_tiny_config(workdir)
    args = ("-n", "--profile", "profiles/slurm", "--configfile", config)
    pinned = ("--set-resources", "finetune:gpu_model=titanrtx")
    refused = run_snakemake(workdir, *args, *pinned, check=False)
    assert refused.returncode != 0
    assert "gpu_class" in refused.stdout + refused.stderr
    run_snakemake(workdir, *args, *pinned, "--config", "gpu_class=titanrtx")
    unknown = run_snakemake(workdir, *args, "--config", "gpu_class=h100", check=False)
    assert unknown.returncode != 0 and "gpu_classes" in unknown.stdout + unknown.stderr


@pytest.fixture(scope="module")
def finished_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny demo run to the end once (local executor); tests work on copies of it."""
    workdir = copy_workflow(tmp_path_factory.mktemp("finished"))
    run_snakemake(workdir, "--configfile", write_tiny_config(workdir))
    return workdir


@pytest.fixture
def finished_copy(finished_demo: Path, tmp_path: Path) -> Path:
    # copytree keeps modification times, so the copy is as up to date as the original.
    return Path(shutil.copytree(finished_demo, tmp_path / "run", symlinks=True))


def test_second_run_does_nothing(finished_copy: Path) -> None:
    out = run_snakemake(finished_copy, "-n", "--configfile", "config/tiny.yaml").stdout
    assert "Nothing to be done" in out


@pytest.mark.slow
@pytest.mark.parametrize(
    ("changed", "overrides"),
    [
        (["compute_de"], {"gears": {"chunk_size": 123}}),
        (["finetune", "finetune_submission"], {"train": {"lr": 0.0003}}),
        (["finetune", "finetune_submission"], {"gpu_class": "titanrtx"}),
        (["submission_scgpt", "submission_baseline"], {"submission": {"max_cells": 5000}}),
    ],
    ids=["de-chunk-size", "learning-rate", "gpu-class", "submission-cap"],
)
def test_param_change_reruns_the_rule_and_what_follows(
    finished_copy: Path, changed: list[str], overrides: dict
) -> None:
    expected = plan(finished_copy, "--configfile", "config/tiny.yaml", "--forcerun", *changed)
    assert set(changed) <= set(rules(expected))
    config = write_tiny_config(finished_copy, **overrides)
    jobs = plan(finished_copy, "--configfile", config)
    assert rules(jobs) == rules(expected)
    for rule in changed:
        assert "params" in next(j for j in jobs if j.rule == rule).reason.lower()


def test_dry_run_plans_the_submission_model_and_the_scratch_ablation(tmp_path: Path) -> None:
    """Per seed: scGPT finetuned and from scratch; once: the all_train submission model."""
    workdir = copy_workflow(tmp_path)
    jobs = plan(workdir, "--configfile", write_tiny_config(workdir, seeds=[1, 2]))
    trained = sorted(j.wildcards for j in jobs if j.rule == "finetune")
    assert trained == [
        f"seed={s}, model_type={m}" for s in (1, 2) for m in ("scgpt_finetuned", "scgpt_scratch")
    ]
    submission_model = [j for j in jobs if j.rule == "finetune_submission"]
    assert [j.wildcards for j in submission_model] == ["model_type=scgpt_finetuned"]
    assert submission_model[0].gpu_type == "a40"
    assert [j.rule for j in jobs].count("build_submission_split") == 1
    baseline = plan(
        workdir, "--configfile", write_tiny_config(workdir, submission={"model": "linear_scgpt"})
    )
    assert "finetune_submission" not in rules(baseline)
    linear = next(j for j in baseline if j.wildcards == "model_type=linear_scgpt"
                  and j.rule.startswith("submission"))  # fmt: skip
    assert linear.rule == "submission_baseline" and linear.gpu_type is None
    assert next(j for j in jobs if j.rule == "submission_scgpt").gpu_type == "a40"


def test_prediction_takes_its_cells_per_model_call_from_the_gpu_class(tmp_path: Path) -> None:
    workdir = copy_workflow(tmp_path)
    small = {"slurm_gpu": "small", "batch_size": 8, "accumulation": 8, "precision": "fp16"}
    classes = {"small": {**small, "predict_batch_size": 48}}
    predicting = ("predict_scgpt", "predict_baseline", "submission_scgpt", "submission_baseline")
    for batch in ("none", "16"):
        config = write_tiny_config(
            workdir,
            gpu_class="small",
            gpu_classes=classes,
            predict={"batch_size": int(batch) if batch != "none" else None},
        )
        jobs = [j for j in plan(workdir, "-p", "--configfile", config) if j.rule in predicting]
        assert {j.rule for j in jobs} == set(predicting)
        for job in jobs:
            assert f"--batch-size {batch}" in job.shell, job.shell
            assert ("--gpu-batch-size 48" in job.shell) == job.rule.endswith("scgpt"), job.shell


@pytest.mark.parametrize(("gpu_class", "precision"), [("a40", "bf16"), ("titanrtx", "fp16")])
def test_scgpt_predicts_in_the_precision_it_trains_in(
    tmp_path: Path, gpu_class: str, precision: str
) -> None:
    workdir = copy_workflow(tmp_path)
    config = write_tiny_config(workdir, gpu_class=gpu_class)
    jobs = plan(workdir, "-p", "--configfile", config)
    finetune = next(j for j in jobs if j.rule == "finetune")
    assert f"--precision {precision}" in finetune.shell
    for job in jobs:
        if job.rule in ("predict_scgpt", "submission_scgpt"):
            assert f"--precision {precision}" in job.shell, job.rule
        elif job.rule in ("predict_baseline", "submission_baseline"):
            assert "--precision" not in job.shell
    amp_off = plan(workdir, "-p", "--configfile", write_tiny_config(workdir, train={"amp": False}))
    assert "--precision fp32" in next(j for j in amp_off if j.rule == "predict_scgpt").shell


@pytest.mark.parametrize(
    ("overrides", "complaint"),
    [
        ({"gears": {"split": "no_split"}}, "gears"),
        ({"gears": {"split": "no_test"}}, "gears"),
        ({"gears": {"split": "all_train"}}, "gears"),
        ({"gears": {"split": "custom"}}, "gears.test_perts"),
    ],
    ids=["no_split", "no_test", "all_train", "custom-without-test-perts"],
)
def test_splits_that_cannot_be_evaluated_are_refused(
    tmp_path: Path, overrides: dict, complaint: str
) -> None:
    workdir = copy_workflow(tmp_path)
    config = write_tiny_config(workdir, **overrides)
    result = run_snakemake(workdir, "-n", "--configfile", config, check=False)
    assert result.returncode != 0
    message = result.stdout + result.stderr
    assert complaint in message and overrides["gears"]["split"] in message


@pytest.mark.slow
def test_replacing_the_raw_input_reruns_everything(finished_copy: Path) -> None:
    everything = plan(finished_copy, "--configfile", "config/tiny.yaml", "--forceall")
    raw = finished_copy / "resources/demo/adata_Training.h5ad"
    new = finished_copy / "new_release.h5ad"
    cli = str(Path(sys.executable).with_name("scgpt-vcc"))
    subprocess.run(
        [cli, "make-synthetic-dataset", "--gene-list", "resources/reference/vcc_gene_names.csv",
         "--out-adata", str(new), "--out-validation-counts", str(finished_copy / "v.csv"),
         "--out-gene-names", str(finished_copy / "g.csv"), "--n-cells", "600",
         "--n-genes", "300", "--n-perturbations", "8", "--n-validation-perturbations", "3",
         "--seed", "7"],
        cwd=finished_copy, check=True, capture_output=True,
    )  # fmt: skip
    os.replace(new, raw)
    jobs = plan(finished_copy, "--configfile", "config/tiny.yaml")
    # Not rerun: what generates the demo inputs, and the conversion of the held-out truth,
    # which the new release leaves unchanged.
    generated = {"make_synthetic_dataset", "make_synthetic_checkpoint", "convert_submission_truth"}
    assert rules(jobs) == [r for r in rules(everything) if r not in generated]


def test_lint_and_snakefmt_are_clean(tmp_path: Path) -> None:
    workdir = copy_workflow(tmp_path)
    lint = run_snakemake(workdir, "--lint", "--configfile", "config/demo.yaml", check=False)
    assert lint.returncode == 0, lint.stdout[-4000:] + lint.stderr[-4000:]
    snakefmt = str(Path(sys.executable).with_name("snakefmt"))
    fmt = subprocess.run([snakefmt, "--check", "workflow"], cwd=REPO, capture_output=True)
    assert fmt.returncode == 0, fmt.stderr.decode()[-4000:]


def test_an_hgnc_table_renames_genes_for_every_model_that_uses_the_vocabulary(
    tmp_path: Path,
) -> None:
    workdir = copy_workflow(tmp_path)
    table = workdir / "hgnc_complete_set.txt"
    table.write_text("symbol\tprev_symbol\talias_symbol\nYARS1\tYARS\t\n")
    jobs = plan(workdir, "-p", "--configfile", write_tiny_config(workdir, hgnc_table=str(table)))
    match = next(j for j in jobs if j.rule == "match_vocabulary")
    assert f"--hgnc-table {table}" in match.shell
    renames = "--gene-renames results/gears/demo/vocab_match.json"
    for job in jobs:
        model = re.search(r"--model-type (\w+)", job.shell)
        if job.rule in ("finetune", "finetune_submission"):
            assert renames in job.shell, job.rule
        elif model and job.rule.startswith(("predict", "submission")):
            uses_vocab = model.group(1).startswith("scgpt") or model.group(1) == "linear_scgpt"
            assert (renames in job.shell) == uses_vocab, (job.rule, model.group(1))
    without = plan(workdir, "-p", "--configfile", write_tiny_config(workdir))
    assert "--hgnc-table" not in next(j for j in without if j.rule == "match_vocabulary").shell


def test_each_model_type_gets_only_the_settings_it_uses(tmp_path: Path) -> None:
    workdir = copy_workflow(tmp_path)
    jobs = plan(workdir, "-p", "--configfile", write_tiny_config(workdir))
    shells = {
        re.search(r"--model-type (\w+)", j.shell).group(1): j.shell
        for j in jobs
        if j.rule.startswith("predict_")
    }
    assert set(shells) == {"scgpt_finetuned", "scgpt_scratch", "control", "train_mean",
                           "linear", "linear_scgpt"}  # fmt: skip
    for model, shell in shells.items():
        assert ("--chunk-size" in shell) == model.startswith("scgpt"), model
        assert ("--linear-pca-dim" in shell) == model.startswith("linear"), model
        assert "--batch-size" in shell and "--n-cells" in shell, model
