#!/usr/bin/env bash
# On the GPU machine: put the pieces bench/triton_pack.sh made (copied there together, or one at a
# time to a machine that stays up in between) back together into a folder to put first on PYTHONPATH.
# Usage: bash bench/triton_unpack.sh .t39 /tmp/triton39 && export PYTHONPATH=/tmp/triton39
set -euo pipefail
src=${1:?folder of pieces}
dest=${2:?destination folder}
mkdir -p "$dest"
cat "$src"/*/part* | xz -dc | tar -x -C "$dest"
# The pack leaves out the AMD backend, which Triton would still import through its entry point.
sed -i '/^amd = /d' "$dest"/triton-*.dist-info/entry_points.txt
PYTHONPATH="$dest" python3 -c "import triton; print('unpacked Triton', triton.__version__, 'from', triton.__file__)"
