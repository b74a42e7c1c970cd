#!/usr/bin/env bash
# On the GPU machine: install the wheels bench/gpu_wheels.sh carried in .whl/ and run the GPU
# check. Usage: bash bench/gpu_check.sh OUT [bench/gpu_check.py options]
set -euo pipefail
out=${1:?usage: bash bench/gpu_check.sh OUT [gpu_check.py options]}
shift
install() {  # TARGET WHEEL...
  local target=$1; shift
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$target" "$@"
}
install /tmp/site .whl/*.whl
paths=/tmp/site
if python3 -c 'import sys, pandas; sys.exit(int(pandas.__version__.split(".")[0]) < 3)'; then
  install /tmp/pd .whl/pandas/*.whl  # anndata needs pandas < 3
  paths=/tmp/pd:$paths
fi
PYTHONPATH=$paths:$PWD/src PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --out "$out" "$@"
