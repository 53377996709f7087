#!/usr/bin/env bash
# Device run for issue 4: build the C++ op, memcheck it, GPU tests, then the kernel benchmark.
# Writes logs/results to $OUT. Usage (device tool, repo root):
#   bash benchmarks/device_kernels.sh [bench args...]      e.g. --models llama3-8b
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export VLLM_SPARSE24_EXT_DIR=${VLLM_SPARSE24_EXT_DIR:-/tmp/sparse24_ext}
LOG="$OUT/run.log"
# vLLM (for the int8_cutlass rows of kernels.py) when the bundle is carried (carry [".gpu_bundle"])
. benchmarks/device_env.sh
if s24_bundle /tmp/bundle.log; then
  BUNDLE="vLLM bundle installed: $(python3 -c 'import vllm; print(vllm.__version__)' 2>&1 | tail -1)"
fi
{
echo "${BUNDLE:-no vLLM bundle (no int8_cutlass rows)}"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cslt', torch.backends.cusparselt.version())"
nvcc --version | tail -1; which ninja || python3 -c "import ninja; print('ninja module', ninja.__version__)"
echo "## build C++ extension"
T0=$(date +%s)
python3 -c "
from vllm_sparse24.kernels.cuda import ext
ok = ext.build(verbose=False); print('ext build ok', ok, ext.error())"
echo "build s: $(( $(date +%s) - T0 ))"
} 2>&1 | tee "$LOG" | tail -30
SAN=skipped; TESTS=skipped
if [ "${SKIP_SANITIZER:-0}" != 1 ]; then
  echo "## compute-sanitizer memcheck: python3 benchmarks/debug_decode.py --ext" >> "$LOG"
  timeout 120 compute-sanitizer --tool memcheck --error-exitcode 9 python3 benchmarks/debug_decode.py --ext 2>&1 \
    | tee -a "$LOG" | tail -16
  SAN=$([ "${PIPESTATUS[0]}" = 0 ] && echo PASS || echo "FAIL(rc ${PIPESTATUS[0]})")
fi
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  echo "## pytest tests/test_gpu_kernels.py tests/test_cslt_layout.py" >> "$LOG"
  timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_kernels.py tests/test_cslt_layout.py 2>&1 \
    | tee "$OUT/tests.log" | tail -30
  cat "$OUT/tests.log" >> "$LOG"
  TESTS=$(tail -1 "$OUT/tests.log")
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  BT=${BENCH_TIMEOUT:-$(( ${TOTAL_S:-530} - SECONDS ))}; echo "bench timeout ${BT}s"
  timeout "$BT" python3 benchmarks/kernels.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log" | grep -v "^  " | tail -30
  echo "=== acceptance ==="
  echo "sanitizer (debug_decode.py --ext, memcheck): $SAN"
  echo "gpu tests: $TESTS"
  sed -n '/^acceptance/,$p' "$OUT/bench.log"
fi
