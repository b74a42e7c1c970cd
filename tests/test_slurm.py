"""The demo workflow runs through a real single-node SLURM with profiles/slurm.

The cluster (tests/slurm_cluster.py) has one fake ``gpu:a40`` and one fake ``gpu:titanrtx``; the
tests read back what SLURM allocated (``scontrol show job``), so the GPU type, memory and time limit
checked here are what sbatch really asked for.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import SNAKEMAKE, copy_workflow, run_snakemake, write_tiny_config
from tests.dag_support import PlannedJob, plan
from tests.slurm_cluster import SlurmCluster, SlurmError, ensure_installed

# Flags for a cluster without an accounting database (the shipped profile keeps the defaults):
# squeue instead of sacct for job status, and a short first status check for short jobs.
GPU_CLASSES = ("a40", "titanrtx")
PROFILE = Path("profiles/slurm/config.v8+.yaml")
TEST_CLUSTER_FLAGS = (
    "--slurm-status-command",
    "squeue",
    "--slurm-init-seconds-before-status-checks",
    "1",
)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A running single-node SLURM for the whole session; SLURM_CONF points at it meanwhile."""
    if os.geteuid() != 0:
        try:
            ensure_installed()
        except SlurmError as err:
            pytest.skip(f"no SLURM test cluster without root: {err}")
    # Not under pytest's tmp folder: munged (user munge) must reach its socket folder.
    root = Path(tempfile.mkdtemp(prefix="scgpt-vcc-slurm-"))
    cluster = SlurmCluster(root).start()
    saved = os.environ.get("SLURM_CONF")
    os.environ.update(cluster.env)
    try:
        yield cluster
    finally:
        cluster.stop()
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved
        shutil.rmtree(root, ignore_errors=True)


def profile_resources(root: Path) -> dict[str, dict]:
    return yaml.safe_load((root / PROFILE).read_text())["set-resources"]


def ensure_a_gpu_job(workdir: Path, args: tuple[str, ...], gpu_type: str) -> list[PlannedJob]:
    """The run's plan; until the workflow has a GPU rule, convert_to_gears asks for the class GPU.

    The stand-in edits only the test's copy of the profile; gpu_model equal to the class passes
    the workflow's guard, so the plugin's --gpus=<type>:1 request still meets SLURM for real.
    """
    jobs = plan(workdir, *args)
    if any(job.gpu_type for job in jobs):
        return jobs
    settings = yaml.safe_load((workdir / PROFILE).read_text())
    settings["set-resources"]["convert_to_gears"].update(gpu=1, gpu_model=gpu_type)
    (workdir / PROFILE).write_text(yaml.safe_dump(settings))
    return plan(workdir, *args)


def jobs_of_run(cluster: SlurmCluster, workdir: Path) -> list[dict[str, str]]:
    """SLURM's record of the jobs submitted from ``workdir``."""
    return [job for job in cluster.jobs() if job.get("WorkDir") == str(workdir)]


def rule_of(job: dict[str, str]) -> str:
    return job["Comment"].removeprefix("rule_").split("_wildcards_")[0]


def start_snakemake(workdir: Path, *args: str) -> subprocess.Popen:
    """Start snakemake in ``workdir`` in the background, its output going to run.log there."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    with open(workdir / "run.log", "w") as log:
        return subprocess.Popen(
            [SNAKEMAKE, "--cores", "2", *args],
            cwd=workdir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def memory_mb(value: str) -> float:
    """scontrol's memory field (e.g. '4000M', '62.50G') in MB."""
    scale = {"M": 1, "G": 1024, "T": 1024**2}
    return float(value[:-1]) * scale[value[-1]]


def limit_minutes(value: str) -> int:
    """scontrol's time limit ('[D-]HH:MM:SS') in minutes."""
    days, _, clock = value.rpartition("-")
    hours, minutes, _seconds = (int(part) for part in clock.split(":"))
    return (int(days or 0) * 24 + hours) * 60 + minutes


@pytest.mark.slow
def test_demo_runs_through_slurm_with_the_class_gpu(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    # Both classes at once: the runs mostly wait on the plugin's status checks.
    runs = {}
    for gpu_class in GPU_CLASSES:
        workdir = copy_workflow(tmp_path / gpu_class)
        config = write_tiny_config(workdir, gpu_class=gpu_class)
        args = ("--profile", "profiles/slurm", "--configfile", config)
        planned = ensure_a_gpu_job(workdir, args, gpu_class)
        runs[gpu_class] = (workdir, planned, start_snakemake(workdir, *args, *TEST_CLUSTER_FLAGS))

    for gpu_class, (workdir, planned, proc) in runs.items():
        assert proc.wait(timeout=900) == 0, (workdir / "run.log").read_text()[-6000:]
        jobs = jobs_of_run(slurm_cluster, workdir)
        assert sorted(map(rule_of, jobs)) == sorted(j.rule for j in planned), "all went via SLURM"
        gpu_jobs = sorted(rule_of(j) for j in jobs if "gpu" in j.get("TresPerJob", ""))
        assert gpu_jobs == sorted(j.rule for j in planned if j.gpu_type), gpu_class
        resources = profile_resources(workdir)
        # evaluate and the ceiling take their memory from the config, where it was measured.
        defaults = yaml.safe_load((workdir / "config" / "config.yaml").read_text())
        rule_memory = dict.fromkeys(("evaluate", "vcc2025_ceiling"), defaults["evaluate"]["mem_mb"])
        for job in jobs:
            rule = rule_of(job)
            assert job["JobState"] == "COMPLETED", job
            if rule in gpu_jobs:
                assert job["TresPerJob"] == f"gres:gpu:{gpu_class}:1", job
            wanted = resources[rule]
            expected_mb = wanted.get("mem_mb", rule_memory.get(rule))
            assert memory_mb(job["MinMemoryNode"]) == expected_mb, job
            assert limit_minutes(job["TimeLimit"]) == wanted["runtime"], job
        assert gpu_jobs, "a GPU job met SLURM"


def test_shipped_profile_keeps_the_plugin_status_default() -> None:
    """Real clusters have sacct: the squeue switch belongs to the tests, not the profile."""
    profile = Path(__file__).parents[1] / PROFILE
    settings = yaml.safe_load(profile.read_text())
    assert settings["executor"] == "slurm"
    assert "slurm-status-command" not in settings
    assert "tasks" not in settings["default-resources"]
    assert "cpus_per_task" not in settings["default-resources"]
    assert not (profile.parents[1] / "default").exists(), "profiles/default/ overrides --profile"


@pytest.mark.slow
def test_two_node_finetune_follows_one_process(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """train.nodes: 2 through SLURM: srun starts two torchrun agents that meet by c10d
    rendezvous (gloo on CPU processes); the loss curve is one process's with the same
    effective batch (8 x 1 x 2 processes = 8 x 2 accumulation x 1).

    The test cluster has one node, so the job's ``nodes`` request is set to 1 there; the two
    launcher tasks, the rendezvous and the launch command are the ones the workflow ships.
    """
    train = {"batch_size": 8, "epochs": 1, "device": "cpu", "cpu_amp": False, "dropout": 0.0}
    one = copy_workflow(tmp_path / "one")
    target = "results/models/demo/seed1/scgpt_finetuned/steps.csv"
    config = write_tiny_config(one, train={**train, "accumulation": 2})
    run_snakemake(one, target, "--configfile", config)
    two = Path(shutil.copytree(one, tmp_path / "two", symlinks=True))
    shutil.rmtree(two / "results" / "models")
    config = write_tiny_config(two, train={**train, "accumulation": 1, "nodes": 2})
    args = (target, "--profile", "profiles/slurm", "--configfile", config)
    jobs = plan(two, *args)
    assert [j.rule for j in jobs] == ["finetune"], "only the training goes to SLURM"
    assert jobs[0].resources["nodes"] == "2" and jobs[0].resources["gres"] == "gpu:a40:1"
    proc = start_snakemake(two, *args, "--set-resources", "finetune:nodes=1", *TEST_CLUSTER_FLAGS)
    assert proc.wait(timeout=600) == 0, (two / "run.log").read_text()[-6000:]

    (job,) = [j for j in jobs_of_run(slurm_cluster, two) if rule_of(j) == "finetune"]
    assert job["JobState"] == "COMPLETED" and job["NumTasks"] == "2", job
    run_log = (two / target).with_name("run.log").read_text()
    assert "processes 2" in run_log and "effective batch 16 (= 8 x 1 x 2 processes)" in run_log
    single = pd.read_csv(one / target)["loss"]
    double = pd.read_csv(two / target)["loss"]
    assert len(single) == len(double) > 5
    pd.testing.assert_series_equal(single, double, rtol=1e-4)
