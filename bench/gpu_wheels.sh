#!/usr/bin/env bash
# Here, before a GPU run: download into .whl/ the wheels bench/gpu_check.py needs that the GPU
# machine's image lacks, at the versions of constraints.txt, for its Python 3.12. pandas and
# its two needs go to .whl/pandas/: the image's pandas 3 is too new for anndata, so
# bench/gpu_check.sh installs them only where pandas >= 3. Name `.whl` in the device call's carry.
set -euo pipefail
cd "$(dirname "$0")/.."
MISSING=(anndata array-api-compat cell-gears dcor donfig google-crc32c legacy-api-wrap natsort
  numcodecs pynndescent scanpy scgpt scverse-misc session-info2 umap-learn zarr)
PANDAS=(pandas pytz tzdata)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64
  manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)

pinned() {  # NAME==VERSION from constraints.txt, or fail naming the package
  grep -i -m1 "^$1==" constraints.txt || { echo "constraints.txt pins no $1" >&2; exit 1; }
}

download() {  # DIR NAME...
  local dir=$1; shift
  local specs=() platforms=()
  for name in "$@"; do specs+=("$(pinned "$name")"); done
  for p in "${PLATFORMS[@]}"; do platforms+=(--platform "$p"); done
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d "$dir" "${specs[@]}"
}

rm -rf .whl
download .whl "${MISSING[@]}"
download .whl/pandas "${PANDAS[@]}"
du -sh .whl
