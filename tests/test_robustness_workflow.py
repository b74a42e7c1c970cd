"""A workflow job killed while it writes its output (issue 7): nothing complete-looking is
left, Snakemake records the job as incomplete, and the rerun recovers."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import pytest

from tests.conftest import SNAKEMAKE, copy_workflow, run_snakemake, write_tiny_config

OUTPUT = "results/gears/demo/converted.h5ad"


def _start(workdir: Path, config: str) -> subprocess.Popen:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.Popen(
        [SNAKEMAKE, "--cores", "1", OUTPUT, "--configfile", config],
        cwd=workdir,
        env=env,
        start_new_session=True,  # own process group: snakemake and its job
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for_write(workdir: Path, proc: subprocess.Popen) -> None:
    """Return once the job writes its output's temporary file (the long write pass)."""
    folder = workdir / Path(OUTPUT).parent
    stale = set(folder.glob(".converted.h5ad.tmp*"))  # left by an earlier killed job
    deadline = time.monotonic() + 60
    while not set(folder.glob(".converted.h5ad.tmp*")) - stale:
        assert proc.poll() is None, "snakemake ended before the write started"
        assert time.monotonic() < deadline, "the write did not start"
        time.sleep(0.02)
    time.sleep(0.2)
    assert proc.poll() is None, "the job finished before it could be killed"


def _job_pid(snakemake_pid: int) -> int:
    """The ``scgpt-vcc`` process in snakemake's process group."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            if os.getpgid(int(entry.name)) != snakemake_pid:
                continue
        except (OSError, ProcessLookupError):
            continue
        if (
            any(part.endswith(b"scgpt-vcc") for part in cmdline[:2])
            and b"convert-to-gears" in cmdline
        ):
            return int(entry.name)
    raise AssertionError("no scgpt-vcc job found")


def _left_behind(workdir: Path) -> list[str]:
    return sorted(p.name for p in (workdir / Path(OUTPUT).parent).iterdir())


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the job through /proc")
def test_job_killed_while_writing_leaves_nothing_complete_and_rerun_recovers(
    workflow_dir: Path,
) -> None:
    config = write_tiny_config(workflow_dir, convert={"chunk_size": 1})  # a slow, long write
    run_snakemake(workflow_dir, "resources/demo/adata_Training.h5ad", "--configfile", config)

    # 1. The cluster kills the job; snakemake sees the failure.
    proc = _start(workdir=workflow_dir, config=config)
    _wait_for_write(workflow_dir, proc)
    os.kill(_job_pid(proc.pid), signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "Error in rule convert_to_gears" in out
    [stale] = _left_behind(workflow_dir)  # only a hidden temporary, never converted.h5ad
    assert stale.startswith(".converted.h5ad.tmp")

    # 2. The node dies: snakemake and its job are killed together.
    proc = _start(workdir=workflow_dir, config=config)
    _wait_for_write(workflow_dir, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (workflow_dir / OUTPUT).exists()
    assert all(name.startswith(".converted.h5ad.tmp") for name in _left_behind(workflow_dir))
    markers = workflow_dir / ".snakemake" / "incomplete"
    recorded = [base64.b64decode(p.name).decode() for p in markers.iterdir()]
    assert recorded == [OUTPUT]  # snakemake's record of a started, unfinished job
    locked = run_snakemake(workflow_dir, OUTPUT, "--configfile", config, check=False)
    assert locked.returncode != 0 and "cannot be locked" in locked.stdout + locked.stderr

    # 3. The documented recovery: unlock, rerun the incomplete job.
    run_snakemake(workflow_dir, "--unlock", "--configfile", config)
    run_snakemake(workflow_dir, OUTPUT, "--rerun-incomplete", "--configfile", config)
    assert _left_behind(workflow_dir) == ["converted.h5ad"]  # stale temporaries removed
    assert ad.read_h5ad(workflow_dir / OUTPUT).shape == (600, 300)
    assert not list(markers.iterdir())


def test_a_job_without_the_cli_on_path_says_what_to_do(tmp_path: Path) -> None:
    """``.venv/bin/snakemake`` run without activating the environment: the first job stops
    with the fix instead of a bare exit 127."""
    workdir = copy_workflow(tmp_path)
    config = write_tiny_config(workdir)
    bare = {**os.environ, "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [SNAKEMAKE, "--cores", "1", "--configfile", config],
        cwd=workdir, env=bare, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "scgpt-vcc is not on PATH: activate the environment first" in output
    assert "source .venv/bin/activate" in output
