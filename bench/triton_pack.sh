#!/usr/bin/env bash
# Pack a Triton release from PyPI for a GPU machine without network, in pieces small enough to
# travel one at a time (the GPU machine has torch with Triton 3.6; a Triton 3.9 wheel is 285 MB).
# Usage (repo root, any x86-64 Linux with pip): bash bench/triton_pack.sh 3.9.0 .t39
# Leaves DEST/a/part00, DEST/b/part01, ...: xz of a tar holding the triton package without its AMD
# backend, the one of its two ptxas that does not build sm_90 (up to 3.8 sm_90 takes ptxas, from
# 3.9 the newer one Triton names ptxas-blackwell), CUPTI, proton, instrumentation, the disassemblers,
# and the headers and libraries for building plugins, with libtriton.so stripped of debug symbols
# (500 MB -> 192 MB): 51 MB for 3.9. bench/triton_unpack.sh puts it back together on the GPU
# machine. The wheel must match the GPU machine's Python (3.12 there).
set -euo pipefail
version=${1:?Triton version}
dest=${2:?destination folder}
work=$(mktemp -d)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 -d "$work" "triton==$version"
(cd "$work" && unzip -q triton-*.whl)
strip --strip-unneeded "$work/triton/_C/libtriton.so"
unused_ptxas=ptxas-blackwell
[ "$(printf '%s\n' 3.9 "$version" | sort -V | head -1)" = 3.9 ] && unused_ptxas=ptxas
tar -C "$work" --exclude=triton/backends/amd --exclude='triton/backends/nvidia/lib/cupti*' \
    --exclude="triton/backends/nvidia/bin/$unused_ptxas" --exclude=triton/_C/libproton.so \
    --exclude=triton/instrumentation --exclude=triton/FileCheck --exclude=__pycache__ \
    --exclude=triton/include --exclude=triton/plugins --exclude=triton/backends/nvidia/bin/nvdisasm \
    --exclude=triton/backends/nvidia/bin/cuobjdump \
    -cf - triton "triton-$version.dist-info" | xz -9e -T0 > "$work/triton.tar.xz"
mkdir -p "$dest"
split -b 40M -d "$work/triton.tar.xz" "$work/part"
i=0
for part in "$work"/part*; do
    piece=$(printf "%s/%b" "$dest" "\\x$(printf %x $((97 + i)))")  # a, b, c, ...
    mkdir -p "$piece" && mv "$part" "$piece/"
    i=$((i + 1))
done
rm -rf "$work"
ls -lR "$dest"
