#!/usr/bin/env bash
# GPU tests of the kernels, then the GEMM benchmark; results and logs in $OUT (default /tmp/sparse24-out).
#   bash benchmarks/offline_host/kernels.sh [benchmarks/gemm_bench.py args...]
# Environment: BUDGET_S (seconds for the whole script, default 540), SKIP_TESTS=1, SKIP_BENCH=1,
#   TESTS (test files, default the two GPU kernel test files), MEMCHECK=1 (the decode GEMM's edge cases
#   under compute-sanitizer's memcheck first).
set -u -o pipefail
OUT=${OUT:-/tmp/sparse24-out}; mkdir -p "$OUT"
LOG="$OUT/run.log"; START=$SECONDS; BUDGET_S=${BUDGET_S:-540}
. benchmarks/offline_host/setup.sh
gpu_host_setup "$LOG" || echo "(no vLLM: benchmark rows without vLLM's kernels)"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader | tee -a "$LOG"
RESULT=skipped
if [ "${MEMCHECK:-0}" = 1 ]; then
  timeout 240 compute-sanitizer --tool memcheck --error-exitcode 1 python3 benchmarks/offline_host/memcheck.py \
    >"$OUT/memcheck.log" 2>&1; echo "memcheck rc=$? ($(grep -c ERROR "$OUT/memcheck.log") error lines)" | tee -a "$LOG"
  tail -4 "$OUT/memcheck.log"
fi
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout 300 python3 -m pytest -q -p no:cacheprovider -rs ${TESTS:-tests/test_gpu_kernels.py tests/test_gpu_decode.py} 2>&1 \
    | tee "$OUT/tests.log" | tail -25
  RESULT=$(tail -1 "$OUT/tests.log")
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  left=$(( BUDGET_S - (SECONDS - START) - 20 ))
  timeout "$left" python3 benchmarks/gemm_bench.py --out "$OUT" --budget-s $(( left - 60 )) "$@" 2>&1 \
    | tee "$OUT/bench.log" | grep -E "^(llama|acceptance|decode|  |best|wrote|time budget|[0-9]+ rows)" | tail -160
fi
echo "gpu tests: $RESULT; total $((SECONDS - START)) s"
