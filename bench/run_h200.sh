#!/usr/bin/env bash
# On an H200, in one run of under 10 minutes: full-size kernel tests, the benchmark, and the demo on
# the GPU. Usage (repo root, diffusers importable by python3; on a machine with no network:
# python3 -m pip install --no-deps <diffusers and importlib_metadata wheels>):
#   OUT=results bash bench/run_h200.sh
# Each step has its own time limit, so a cut-short run still returns what finished; the whole
# run takes 500-550 s.
set -u
OUT=${OUT:-h200-results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/run.log"
# The kernels' tests at full size (the compile and SASS tests need no GPU and run in CI instead).
LITEATTENTION_FULL=1 timeout 300 python3 -m pytest tests/test_semantics.py tests/test_gluon.py tests/test_bench.py -q \
    -k "(triton or gluon or interleaved) and not compiles and not sass" -p no:cacheprovider 2>&1 | tail -12 | tee "$OUT/tests.log"
timeout 60 python3 bench/ab_gluon.py --shapes 1,40,32760,128 --rounds 20 --clock-log "$OUT/clocks.csv" 2>&1 | grep -v Warning | tee "$OUT/first-step.log"
timeout 140 python3 -m liteattention.cli bench --shapes wan14b-480p,ltx --out "$OUT/bench-main" 2>&1 \
    | grep -v Warning | tee -a "$OUT/run.log" | tail -4
timeout 40 python3 -m liteattention.cli demo --device cuda --out "$OUT/demo" 2>&1 | tr '\r' '\n' \
    | grep -v "it/s]$" | tee -a "$OUT/run.log" | tail -30
tar -C "$OUT" -cf "$OUT/demo.tar" demo && rm -r "$OUT/demo"
timeout 155 python3 -m liteattention.cli bench --shapes wan1.3b-480p,hunyuan,wan-720p --patterns random --out "$OUT/bench-more" 2>&1 \
    | grep -v Warning | tee -a "$OUT/run.log" | tail -4
# One archive for both benchmarks' json, table and plot, to keep the results to a few files.
benches=$(cd "$OUT" && ls -d bench-main bench-more 2>/dev/null)
[ -n "$benches" ] && tar -C "$OUT" -cf "$OUT/bench.tar" $benches && (cd "$OUT" && rm -r $benches)
echo "total ${SECONDS} s" | tee -a "$OUT/run.log"
