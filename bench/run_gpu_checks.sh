#!/usr/bin/env bash
# compute-sanitizer (memcheck, racecheck, synccheck) over both kernels at odd shapes, then a soak of
# thousands of calls with shape changes and resets (GPU and host memory must stay flat).
#   OUT=results bash bench/run_gpu_checks.sh
set -u
OUT=${OUT:-gpu-checks}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 bench/sanitizer_cases.py --calls 1 > /dev/null  # compile outside the sanitizer (Triton's cache)
for tool in memcheck racecheck synccheck; do
    timeout 60 compute-sanitizer --tool "$tool" python3 bench/sanitizer_cases.py --calls 2 > "$OUT/$tool.log" 2>&1
    echo "$tool: exit $?; $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/$tool.log" | tail -1)" | tee -a "$OUT/checks.log"
done
timeout 90 python3 bench/soak.py --calls 3000 2>&1 | tee "$OUT/soak.log" | tail -3 | tee -a "$OUT/checks.log"
