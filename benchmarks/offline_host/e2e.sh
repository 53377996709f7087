#!/usr/bin/env bash
# End-to-end runs through vLLM on a GPU host; results and logs in $OUT (default /tmp/sparse24-out).
#   bash benchmarks/offline_host/e2e.sh [accuracy] [serve] [throughput]        (default: all three)
# Environment:
#   TP_ARGS      benchmarks/throughput.py arguments (default: all 32 layers of Llama-3-8B, --profile)
#   ACC_RUNS     benchmarks/e2e_accuracy.py runs (default "cuda-bf16,torch-fp32")
#   BUDGET_S     seconds for the whole script (default 560); throughput gets what is left
set -u -o pipefail
OUT=${OUT:-/tmp/sparse24-out}; mkdir -p "$OUT"
LOG="$OUT/run.log"; START=$SECONDS; BUDGET_S=${BUDGET_S:-560}
STEPS=${*:-accuracy serve throughput}
say() { echo "== $*" | tee -a "$LOG"; }
# full output to run.log; the console keeps the lines worth reading
quiet() { tee -a "$LOG" | grep --line-buffered -E "^(==|\[|ROW|PROFILE|  |\||server|BUILD|FAILED|Traceback|[A-Za-z]*Error)" | cut -c1-300; }
left() { echo $((BUDGET_S - (SECONDS - START))); }

. benchmarks/offline_host/setup.sh
gpu_host_setup "$LOG" || { say "vLLM not importable"; tail -20 "$LOG"; exit 1; }
say "setup took $((SECONDS - START))s; steps: $STEPS"
declare -A RC
for step in $STEPS; do
  t0=$SECONDS
  case $step in
    accuracy)  # in-process engines: readable tracebacks
      if [[ "${ACC_RUNS:-}" == *smollm2* && ! -d models/smollm2-sparse24 ]]; then  # parts copied in by hand
        python3 benchmarks/offline_host/checkpoint_parts.py join --out models/smollm2-sparse24 2>&1 | tail -3
      fi
      VLLM_ENABLE_V1_MULTIPROCESSING=0 timeout "${ACC_TIMEOUT:-300}" python3 benchmarks/e2e_accuracy.py --out "$OUT" \
        --runs "${ACC_RUNS:-cuda-bf16,torch-fp32}" 2>&1 | quiet
      RC[$step]=${PIPESTATUS[0]} ;;
    serve)
      timeout 240 python3 benchmarks/serve_check.py --out "$OUT" --clients 32 --max-tokens 64 --ready-timeout 180 2>&1 | quiet
      RC[$step]=${PIPESTATUS[0]} ;;
    throughput)
      tb=$(( $(left) - 15 ))
      timeout $((tb + 10)) python3 benchmarks/throughput.py --out "$OUT" --time-budget $tb \
        ${TP_ARGS:---profile --workloads prefill_256x1024x16,decode_1x128x512,decode_8x128x512,decode_64x128x512} 2>&1 | quiet
      RC[$step]=${PIPESTATUS[0]} ;;
    *) say "unknown step $step"; RC[$step]=2 ;;
  esac
  say "$step rc=${RC[$step]} in $((SECONDS - t0))s ($(left)s left)"
done
rm -f "$OUT"/.rows-* "$OUT"/.profile-* 2>/dev/null
say "summary: $(for s in $STEPS; do printf '%s=%s ' "$s" "${RC[$s]}"; done) total $((SECONDS - START))s"
cat "$OUT"/throughput-*.md 2>/dev/null
for s in $STEPS; do [ "${RC[$s]}" = 0 ] || exit 1; done
exit 0
