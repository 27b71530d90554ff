#!/usr/bin/env bash
# The kernels under several Triton releases on one GPU: the machine's (3.6 on the H200 and H100 used
# here) and newer ones unpacked by bench/triton_unpack.sh. Each phase runs in under 10 minutes.
#   OUT=results bash bench/run_triton_versions.sh tests [TRITON_DIR]  # kernel tests (FULL=1 adds full size)
#   OUT=results bash bench/run_triton_versions.sh bench TRITON_DIR... # benchmark under each release, back to back
#   OUT=results OLD=path/src bash bench/run_triton_versions.sh ab     # this tree against an older one, same Triton
#   OUT=results bash bench/run_triton_versions.sh profile TRITON_DIR... # where a marking call's time goes, per release
# Ratios (dense / cuDNN, first step / dense, s / dense, Flex / ours) are taken within one process
# each; the processes run back to back on the same GPU.
set -u
phase=${1:?phase: tests, bench, profile or ab}
triton_dir=${2:-}
OUT=${OUT:-triton-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
noise='leaked \|nanobind\|refleaks\|skipped remainder'  # Triton 3.9's binding-leak report at exit
src="$PWD/src"
# Sets label and runner for one release: "" is the machine's Triton, else an unpacked folder.
release() {
    label=machine runner=(env PYTHONPATH="$src")
    if [ -n "$1" ]; then label=$(basename "$1") runner=(env PYTHONPATH="$1:$src"); fi
}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader | tee -a "$OUT/gpu.log"
case "$phase" in
tests)
    release "$triton_dir"
    [ "${FULL:-0}" = 1 ] && runner+=(LITEATTENTION_FULL=1)
    "${runner[@]}" python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/tests.log"
    "${runner[@]}" timeout 500 python3 -m pytest tests/test_semantics.py tests/test_gluon.py -q -p no:cacheprovider \
        -k "(triton or gluon or non_finite or anchor) and not compiles and not sass" 2>&1 | grep -v "$noise" | tail -15 | tee -a "$OUT/tests.log"
    ;;
bench)
    shift
    for dir in "" "$@"; do  # the machine's Triton first, then each unpacked one
        release "$dir"
        "${runner[@]}" python3 -c "import torch, triton; print('$label: torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/bench.log"
        # FlexAttention compiles through torch's inductor, which may not take a Triton newer than
        # the one torch was built with: without it, the other ratios still come.
        for flex in "" --no-flex; do
            "${runner[@]}" timeout 280 python3 -m liteattention.cli bench --shapes wan14b-480p,ltx --patterns random \
                --rounds "${ROUNDS:-15}" $flex --out "$OUT/bench-$label" > "$OUT/bench-$label.log" 2>&1 && break
        done
        grep -v "Warning\|$noise" "$OUT/bench-$label.log" | tee -a "$OUT/bench.log" | tail -4
    done
    ;;
profile)
    # Head dim 64 (LTX-Video's shape), where marking under 3.9 ran 8-11% slower than under 3.6: each
    # kernel's device time per call (attention, verdict pass, planner), then ncu's stall samples per
    # SASS instruction of the marking kernel's second launch (the first compiles).
    shift
    shape=${SHAPE:-1,32,16384,64}
    for dir in "" "$@"; do
        release "$dir"
        "${runner[@]}" timeout 120 python3 bench/ab_gluon.py --kernel-times --shapes "$shape" 2>&1 \
            | grep -v "Warning\|$noise" | tee -a "$OUT/profile.log"
        "${runner[@]}" timeout 240 ncu --clock-control none --launch-skip 1 --launch-count 1 -k regex:_gluon_attention_fwd \
            --section WarpStateStats --section SourceCounters -f -o "$OUT/mark-$label" \
            python3 bench/ab_gluon.py --ncu-mode mark --shapes "$shape" > "$OUT/ncu-$label.log" 2>&1
        ncu --import "$OUT/mark-$label.ncu-rep" --page source --print-source sass --csv > "$OUT/mark-$label-sass.csv" 2>&1
        ncu --import "$OUT/mark-$label.ncu-rep" --page details > "$OUT/mark-$label-details.txt" 2>&1
        tail -3 "$OUT/ncu-$label.log"; grep -i "duration\|warp cycles per issued" "$OUT/mark-$label-details.txt" | tee -a "$OUT/profile.log"
    done
    ;;
ab)
    for label in old new; do
        tree=$src; [ "$label" = old ] && tree=${OLD:?OLD=path to the older tree\'s src}
        PYTHONPATH="$tree" timeout 200 python3 -m liteattention.cli bench --shapes wan14b-480p,ltx --patterns random \
            --no-flex --rounds 10 --out "$OUT/ab-$label" 2>&1 | grep -v Warning | tee -a "$OUT/ab.log" | tail -3
    done
    ;;
esac
echo "phase $phase: ${SECONDS} s" | tee -a "$OUT/gpu.log"
