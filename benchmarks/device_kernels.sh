#!/usr/bin/env bash
# Device run for issue 4: memcheck of the decode kernel, GPU tests, then the kernel benchmark.
# Writes logs/results to $OUT. Usage (device tool, repo root):
#   bash benchmarks/device_kernels.sh [bench args...]      e.g. --models llama3-8b
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/env.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cslt', torch.backends.cusparselt.version())" | tee -a "$OUT/env.txt"
SAN=skipped; TESTS=skipped
if [ "${SKIP_SANITIZER:-0}" != 1 ]; then
  timeout 150 compute-sanitizer --tool memcheck --error-exitcode 9 python3 benchmarks/debug_decode.py 2>&1 \
    | tee "$OUT/sanitizer.log" | tail -25
  SAN=$([ "${PIPESTATUS[0]}" = 0 ] && echo PASS || echo "FAIL(rc ${PIPESTATUS[0]})")
fi
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_kernels.py tests/test_cslt_layout.py 2>&1 \
    | tee "$OUT/tests.log" | tail -40
  TESTS=$(tail -1 "$OUT/tests.log")
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  timeout "${BENCH_TIMEOUT:-420}" python3 benchmarks/kernels.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log" | grep -v "^  " | tail -12
  echo "=== acceptance ==="
  echo "sanitizer (debug_decode.py, memcheck): $SAN"
  echo "gpu tests: $TESTS"
  sed -n '/^acceptance/,$p' "$OUT/bench.log"
fi
