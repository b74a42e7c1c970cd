#!/usr/bin/env bash
# Post-deploy script of scgpt-vcc.yaml (--sdm conda): installs the scgpt-vcc package
# into the freshly created environment.
#
# Snakemake runs a copy of this file (.snakemake/conda/<hash>.post-deploy.sh) once,
# right after `conda env create`, with the new environment activated and from the
# working directory of the run (--directory). Neither this script's path nor the
# working directory leads back to the repository, so workflow/rules/common.smk
# exports SCGPT_VCC_REPO: the repository that holds the running Snakefile.
set -euo pipefail

repo="${SCGPT_VCC_REPO:-}"
if [ -z "$repo" ] || ! grep -qs '^name = "scgpt-vcc"$' "$repo/pyproject.toml"; then
    echo "scgpt-vcc post-deploy: SCGPT_VCC_REPO='$repo' is not a checkout of the" \
        "scgpt-vcc repository (no pyproject.toml naming scgpt-vcc). Run the workflow" \
        "from its local repository (snakemake -s <repo>/workflow/Snakefile)." >&2
    exit 1
fi

# --no-deps: the environment file provides the dependencies. --no-build-isolation: setuptools comes from the
# environment too. --editable: jobs run the repository's current code; the
# environment's hash covers the environment files, not the package's sources.
python -m pip install --no-deps --no-build-isolation --editable "$repo"

command -v scgpt-vcc >/dev/null || {
    echo "scgpt-vcc post-deploy: installed $repo, but scgpt-vcc is not on PATH" >&2
    exit 1
}
echo "scgpt-vcc post-deploy: installed scgpt-vcc from $repo"
