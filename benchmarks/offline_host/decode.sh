#!/usr/bin/env bash
# The decode path on a GPU host in one run: the decode GEMM's GPU tests (8-bit and w4a8 int4), its kernel benchmark against
# the CUTLASS 2:4 configs and vLLM's fp8 GEMM, then end-to-end decode throughput of vLLM fp8 against
# sparse24 (+ a step profile while time is left). Results in $OUT (default /tmp/sparse24-out):
# tests.log, bench.log, k/kernels-*.json|png, t/throughput-*.json|md|png, t/profile-*.json
# (t/errors.log: the end of the log when an engine failed), and with the probe step probe.log and
# probe.tgz (the decode GEMM's timing probe: report, PNG timelines, stamps; needs the library built
# with --decode-probe).
#   bash benchmarks/offline_host/decode.sh
# Environment: BUDGET_S (whole run, default 580), ENGINES (default fp8,sparse24), WORKLOADS,
#   MS / MS_70B (kernel benchmark token counts), DECODE_MAX_M (the decode GEMM's threshold in the
#   engines, default 64; 0 when its tests fail), STEPS (default "tests bench e2e"; "probe" adds the
#   timing probe after the tests), PROBE_ARGS (more decode_probe.py arguments, e.g. "--omit 1,2,4,8
#   --unit-blocks 8"), ON_FAIL (stop:
#   a failed decode test ends the run; go: the engines run without the decode GEMM).
set -u -o pipefail
OUT=${OUT:-/tmp/sparse24-out}; mkdir -p "$OUT/k" "$OUT/t"
START=$SECONDS; BUDGET_S=${BUDGET_S:-580}
left() { echo $((BUDGET_S - (SECONDS - START))); }
. benchmarks/offline_host/setup.sh
gpu_host_setup /tmp/sparse24-setup.log || { tail -20 /tmp/sparse24-setup.log; exit 1; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
STEPS=${STEPS:-tests bench e2e}
decode=${DECODE_MAX_M:-64}
if [[ $STEPS == *tests* ]]; then
  timeout 170 python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu_decode.py tests/test_gpu_w4a8.py >"$OUT/tests.log" 2>&1
  tail -12 "$OUT/tests.log"
  if ! grep -qE "^[0-9]+ passed" "$OUT/tests.log"; then
    decode=0; echo "decode GEMM tests did not pass: engines run without it"
    [[ ${ON_FAIL:-stop} == stop ]] && { grep -E "Error|error|assert|FAILED" "$OUT/tests.log" | head -30; exit 1; }
  fi
fi
if [[ $STEPS == *probe* ]]; then
  timeout 120 python3 benchmarks/decode_probe.py --out "$OUT/probe" ${PROBE_ARGS:-} >"$OUT/probe.log" 2>&1
  grep -E "^==|phases|per call|without" "$OUT/probe.log" | cut -c1-230
  tar czf "$OUT/probe.tgz" -C "$OUT" probe && rm -rf "$OUT/probe"
fi
[[ $STEPS == *bench* ]] && timeout 130 python3 benchmarks/gemm_bench.py --out "$OUT/k" --budget-s 90 --models llama3-8b,llama3-70b --ms "${MS:-1,8,16,64}" \
  --ms-70b "${MS_70B:-1,8}" 2>&1 | grep -E "^(llama|  |wrote)" >"$OUT/bench.log"
[[ $STEPS == *bench* ]] && grep -E "^llama" "$OUT/bench.log" | sed 's/sparse24_/s24_/g; s/_cutlass//g' | cut -c1-230
tb=$(( $(left) - 10 ))
[[ $STEPS == *e2e* ]] && VLLM_SPARSE24_DECODE_MAX_M=$decode timeout $((tb + 5)) python3 benchmarks/throughput.py --out "$OUT/t" --time-budget $tb \
  --engines "${ENGINES:-fp8,sparse24}" --workloads "${WORKLOADS:-decode_8x128x512,decode_1x128x512,decode_64x128x512}" \
  --repeats 2 --profile --profile-engines sparse24,fp8 --profile-workloads decode_8x128x64 2>&1 \
  | tee /tmp/sparse24-e2e.log | grep --line-buffered -E "^(\[|ROW|PROFILE|  gap|\||FAILED|Traceback|[A-Za-z]*Error)" | cut -c1-260
# a failed engine's whole traceback comes back with the results
grep -q Traceback /tmp/sparse24-e2e.log 2>/dev/null && tail -300 /tmp/sparse24-e2e.log >"$OUT/t/errors.log"
echo "total $((SECONDS - START)) s (decode GEMM threshold in the engines: $decode)"
