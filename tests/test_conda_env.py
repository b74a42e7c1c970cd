"""`--sdm conda` installs this repository's package into the job environment.

No conda channel is reachable where these tests run, so the environment itself is never
solved or downloaded. Instead a stand-in `conda` (and its `activate` script) goes first on
PATH, and the real Snakemake runs its real code for `--sdm conda --conda-create-envs-only`:
it copies workflow/envs/scgpt-vcc.yaml and its post-deploy script under .snakemake/conda/,
calls `conda env create --file <copy> --prefix <env>` (the stand-in makes an environment
whose `python` only records how it was called), then runs the copied post-deploy script
with that environment activated. The tests read back which directory `python -m pip
install` was given, and check that it is this repository, whatever the working directory.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, SNAKEMAKE, copy_workflow

ENV_FILE = REPO / "workflow" / "envs" / "scgpt-vcc.yaml"
POST_DEPLOY = ENV_FILE.with_name("scgpt-vcc.post-deploy.sh")

# conda: answers what Snakemake asks (version, info, channel priority, clean) and makes an env
# whose bin/python is FAKE_PYTHON.
FAKE_CONDA = r"""#!/usr/bin/env bash
set -euo pipefail
echo "conda $*" >> "$FAKE_CONDA_LOG"
case "$*" in
  --version) echo "conda 24.11.3" ;;
  "info --json") printf '{"conda_prefix": "%s", "platform": "linux-64"}\n' "$FAKE_CONDA_ROOT" ;;
  "config --get channel_priority --json") echo '{"get": {"channel_priority": "strict"}}' ;;
  "env create "*)
    prefix=""; prev=""
    for arg in "$@"; do
      [ "$prev" = "--prefix" ] && prefix="$arg"
      prev="$arg"
    done
    mkdir -p "$prefix/bin" "$prefix/conda-meta"
    cp "$FAKE_PYTHON" "$prefix/bin/python"
    chmod +x "$prefix/bin/python" ;;
  "clean "*) ;;
  *) echo "fake conda: unexpected call: $*" >&2; exit 2 ;;
esac
"""

# The environment's python: logs its arguments and working directory; `-m pip install` also
# puts a scgpt-vcc command next to it, as installing the package would.
FAKE_PYTHON = f"""#!{sys.executable}
import json, os, sys
from pathlib import Path
with open(os.environ["FAKE_PYTHON_LOG"], "a") as log:
    log.write(json.dumps(sys.argv[1:] + [os.getcwd()]) + "\\n")
if sys.argv[1:4] == ["-m", "pip", "install"]:
    cli = Path(sys.argv[0]).with_name("scgpt-vcc")
    cli.write_text("#!/bin/sh\\n")
    cli.chmod(0o755)
"""

# Sourced by Snakemake as `source <conda_prefix>/bin/activate '<env>'`.
FAKE_ACTIVATE = 'export PATH="$1/bin:$PATH"\n'


def _fake_conda(root: Path) -> dict[str, str]:
    """Install the stand-in conda under ``root``; return the environment to run Snakemake in."""
    (root / "bin").mkdir(parents=True)
    conda = root / "bin" / "conda"
    conda.write_text(FAKE_CONDA)
    conda.chmod(0o755)
    (root / "bin" / "activate").write_text(FAKE_ACTIVATE)
    (root / "python").write_text(FAKE_PYTHON)
    env = {key: value for key, value in os.environ.items() if key not in ("SCGPT_VCC_REPO",)}
    env.update(
        PATH=os.pathsep.join([str(root / "bin"), str(Path(sys.executable).parent), env["PATH"]]),
        FAKE_CONDA_ROOT=str(root),
        FAKE_CONDA_LOG=str(root / "conda.log"),
        FAKE_PYTHON=str(root / "python"),
        FAKE_PYTHON_LOG=str(root / "python.log"),
    )
    return env


def _create_envs(snakefile: Path, workdir: Path, cwd: Path, env: dict[str, str]):
    return subprocess.run(
        [
            SNAKEMAKE,
            "--snakefile",
            str(snakefile),
            "--directory",
            str(workdir),
            "--configfile",
            str(workdir / "config" / "demo.yaml"),
            "--sdm",
            "conda",
            "--conda-create-envs-only",
            "--cores",
            "1",
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _python_calls(env: dict[str, str]) -> list[list[str]]:
    log = Path(env["FAKE_PYTHON_LOG"])
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_env_file_has_no_local_pip_path() -> None:
    """Conda runs pip in the folder of the env file's copy (.snakemake/conda/), so a relative
    path there would not reach the repository; the post-deploy script installs the package."""
    spec = yaml.safe_load(ENV_FILE.read_text())
    pip = next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict))
    for requirement in pip:
        words = shlex.split(requirement)
        assert not any(w in ("-e", "--editable") or w.startswith((".", "/")) for w in words), (
            requirement
        )
    names = {str(d).split()[0] for d in spec["dependencies"] if not isinstance(d, dict)}
    assert not {"snakemake", "snakemake-executor-plugin-slurm"} & names
    assert POST_DEPLOY.is_file()


def test_conda_env_installs_this_repository_from_another_working_directory(
    tmp_path: Path,
) -> None:
    env = _fake_conda(tmp_path / "conda")
    env["SCGPT_VCC_REPO"] = str(tmp_path)  # a stale value from outside is replaced
    workdir = copy_workflow(tmp_path / "run")  # another working directory, with its config
    elsewhere = tmp_path / "elsewhere"  # and Snakemake started from a third one
    elsewhere.mkdir()

    result = _create_envs(REPO / "workflow" / "Snakefile", workdir, elsewhere, env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]

    # Snakemake gave conda a copy of the env file under the working directory's .snakemake/.
    creates = [
        line
        for line in Path(env["FAKE_CONDA_LOG"]).read_text().splitlines()
        if line.startswith("conda env create")
    ]
    assert len(creates) == 1, creates
    copied = Path(shlex.split(creates[0])[shlex.split(creates[0]).index("--file") + 1])
    assert copied.resolve().parent == (workdir / ".snakemake" / "conda").resolve()
    assert copied.read_text() == ENV_FILE.read_text()

    # The post-deploy script ran, from the working directory, and pip got this repository.
    calls = _python_calls(env)
    assert len(calls) == 1, (calls, result.stderr[-3000:])
    *args, cwd = calls[0]
    assert Path(cwd).resolve() == workdir.resolve()
    assert args[:3] == ["-m", "pip", "install"], args
    assert "--no-deps" in args and "--editable" in args, args
    assert Path(args[-1]).resolve() == REPO.resolve(), args


def test_conda_env_follows_the_checkout_that_holds_the_rules(tmp_path: Path) -> None:
    """A second checkout (workflow/ next to pyproject.toml) installs itself, not the
    repository whose package runs Snakemake."""
    env = _fake_conda(tmp_path / "conda")
    clone = copy_workflow(tmp_path / "clone")
    shutil.copy2(REPO / "pyproject.toml", clone / "pyproject.toml")

    result = _create_envs(clone / "workflow" / "Snakefile", clone, clone, env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    calls = _python_calls(env)
    assert len(calls) == 1, calls
    assert Path(calls[0][-2]).resolve() == clone.resolve(), calls


def test_conda_env_refuses_a_workflow_copy_without_the_package(tmp_path: Path) -> None:
    """A copy of workflow/ alone holds no package: the post-deploy script stops with a
    message instead of installing whatever is near the working directory."""
    env = _fake_conda(tmp_path / "conda")
    workdir = copy_workflow(tmp_path / "run")

    result = _create_envs(workdir / "workflow" / "Snakefile", workdir, workdir, env)
    assert result.returncode != 0
    assert "is not a checkout of the scgpt-vcc repository" in result.stdout + result.stderr
    assert _python_calls(env) == []


@pytest.mark.parametrize("repo_var", ["", "/nonexistent"])
def test_post_deploy_script_refuses_a_wrong_repository(tmp_path: Path, repo_var: str) -> None:
    result = subprocess.run(
        ["bash", str(POST_DEPLOY)],
        cwd=tmp_path,
        env={**os.environ, "SCGPT_VCC_REPO": repo_var},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "is not a checkout of the scgpt-vcc repository" in result.stderr


# pip name -> conda-forge name, where they differ.
CONDA_NAMES = {"torch": "pytorch", "torch_geometric": "pytorch_geometric"}


def test_env_file_mirrors_the_package_dependencies() -> None:
    """Every runtime dependency of pyproject.toml, with the same lower bound, and no other
    Python package (the job environment is the package's, nothing more)."""
    wanted = {}
    for requirement in importlib.metadata.requires("scgpt-vcc") or []:
        if "extra ==" in requirement:
            continue
        name, bound = re.fullmatch(r"([\w.-]+)>=(\S+)", requirement).groups()
        wanted[CONDA_NAMES.get(name, name)] = bound
    spec = yaml.safe_load(ENV_FILE.read_text())
    listed = {}
    for entry in spec["dependencies"]:
        for requirement in entry["pip"] if isinstance(entry, dict) else [entry]:
            name, bound = re.fullmatch(r"([\w.-]+)\s*(?:>=\s*([^,<\s]+))?.*", requirement).groups()
            listed[name] = bound
    tools = {"python", "pip", "setuptools", "zstd"}  # interpreter, installer, build, program
    assert {k: v for k, v in listed.items() if k not in tools} == wanted
