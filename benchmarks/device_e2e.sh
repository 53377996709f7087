#!/usr/bin/env bash
# Issue 5, one device call: install the vLLM 0.26.0 bundle, make the plugin's entry point visible,
# then run the steps asked. Everything lands in $OUT (<= 8 files come back: run.log, the JSONs, PNG, MD).
#
# Device tool (repo root, carry [".gpu_bundle"]):
#   bash benchmarks/device_e2e.sh [accuracy] [serve] [throughput]        (default: all three)
# Settings (environment):
#   TP_ARGS        extra benchmarks/throughput.py args (default "--num-layers 16")
#   ACC_RUNS       e2e_accuracy.py runs (default "cuda-bf16,torch-fp32"; cuda-bf16-tp2 needs 2 GPUs;
#                  smollm2-* need models/smollm2-sparse24 on the machine, or the parts .carry_smol*/ that
#                  benchmarks/smollm2_carry.py pack made, carried in earlier calls: it is unpacked here)
#   ACC_TIMEOUT    seconds for the accuracy step (default 360)
#   BUDGET_S       seconds for the whole script (default 540); throughput gets what is left
#   VLLM_SPARSE24_DECODE  passed through (unset = the plugin default; 0 = cuSPARSELt for every M)
set -u -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
LOG="$OUT/run.log"
START=$SECONDS
BUDGET_S=${BUDGET_S:-540}
STEPS=${*:-accuracy serve throughput}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
say() { echo "== $*" | tee -a "$LOG"; }
# full output to run.log; the call's own output keeps the lines worth reading
quiet() { tee -a "$LOG" | grep --line-buffered -E "^(==|\[|ROW|SERVE|  |\||server|non-streamed|BUILD|FAILED|Traceback|[A-Za-z]*Error)" | cut -c1-400; }

say "date $(date -u +%FT%TZ) git $(git rev-parse --short HEAD 2>/dev/null) steps: $STEPS"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$LOG"

# 1. the bundle
. benchmarks/device_env.sh
if ! s24_bundle "$LOG"; then
  say "bundle install FAILED"; tail -20 "$LOG"; exit 1
fi
# the openai client of the bundle (3.52) imports httpcore2 + jiter, which the bundle leaves out:
# carried as wheels in .whl (httpcore2 h11 truststore idna jiter), after the bundle on the path
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/s24_whl .whl/*.whl >>"$LOG" 2>&1 \
    && export PYTHONPATH=$PYTHONPATH:/tmp/s24_whl && say "client wheels: $(ls .whl | tr '\n' ' ')"
fi

# 2. the plugin's entry point (vLLM 0.26 finds general plugins through importlib.metadata
#    entry_points(group="vllm.general_plugins") in every process; VLLM_PLUGINS only filters them)
if python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >>"$LOG" 2>&1; then
  say "plugin: pip install -e . (offline) ok"
else  # fallback: a dist-info with the entry point, on PYTHONPATH ($PWD already is)
  say "plugin: pip -e failed, writing a dist-info by hand"
  d=/tmp/s24_meta/vllm_sparse24-0.1.0.dist-info; mkdir -p $d
  printf 'Metadata-Version: 2.1\nName: vllm-sparse24\nVersion: 0.1.0\n' >$d/METADATA
  printf '[vllm.general_plugins]\nsparse24 = vllm_sparse24:register\n' >$d/entry_points.txt
  export PYTHONPATH=/tmp/s24_meta:$PYTHONPATH
fi
python3 -c "import openai; print('== openai client', openai.__version__, 'imports')" 2>&1 | tail -1 | tee -a "$LOG"
python3 - <<'EOF' 2>&1 | tee -a "$LOG" || exit 1
from importlib.metadata import entry_points
import torch, vllm, vllm_sparse24
eps = [e.value for e in entry_points(group="vllm.general_plugins")]
print("== versions: vllm", vllm.__version__, "torch", torch.__version__, "cuda", torch.version.cuda,
      "cusparselt", torch.backends.cusparselt.version(), "| plugin entry points", eps,
      "| vllm_sparse24 from", vllm_sparse24.__file__)
assert "vllm_sparse24:register" in eps, "plugin entry point not visible"
from vllm.plugins import load_general_plugins
load_general_plugins()
from vllm.model_executor.layers.quantization import get_quantization_config
print("== quantization 'sparse24' ->", get_quantization_config("sparse24").__name__)
EOF
say "env VLLM_SPARSE24_DECODE=${VLLM_SPARSE24_DECODE:-<unset>} setup took $((SECONDS - START))s"

declare -A RC
left() { echo $((BUDGET_S - (SECONDS - START))); }
for step in $STEPS; do
  t0=$SECONDS
  case $step in
    accuracy)  # in-process engines: a first start on a fresh machine hung in the multiprocess engine once
      say "accuracy ($(left)s left)"
      if [[ "${ACC_RUNS:-}" == *smollm2* && ! -d models/smollm2-sparse24 ]]; then
        python3 benchmarks/smollm2_carry.py unpack --out models/smollm2-sparse24 2>&1 | tee -a "$LOG" | tail -3
      fi
      VLLM_ENABLE_V1_MULTIPROCESSING=0 timeout "${ACC_TIMEOUT:-360}" python3 benchmarks/e2e_accuracy.py --out "$OUT" --runs "${ACC_RUNS:-cuda-bf16,torch-fp32}" 2>&1 | quiet
      RC[$step]=${PIPESTATUS[0]} ;;
    serve)
      say "serve ($(left)s left)"
      timeout 240 python3 benchmarks/serve_check.py --out "$OUT" --clients 32 --max-tokens 64 --ready-timeout 180 2>&1 | quiet
      RC[$step]=${PIPESTATUS[0]} ;;
    throughput)
      tb=$(( $(left) - 15 ))
      say "throughput ${TP_ARGS:---num-layers 16} ($(left)s left)"
      timeout $((tb + 10)) python3 benchmarks/throughput.py --out "$OUT" --time-budget $tb ${TP_ARGS:---num-layers 16} 2>&1 | quiet
      RC[$step]=${PIPESTATUS[0]} ;;
    *) say "unknown step $step"; RC[$step]=2 ;;
  esac
  say "$step rc=${RC[$step]} in $((SECONDS - t0))s"
done
rm -rf "$OUT"/.rows-* 2>/dev/null
say "summary: $(for s in $STEPS; do printf '%s=%s ' "$s" "${RC[$s]}"; done) total $((SECONDS - START))s"
[ -f "$OUT"/e2e-accuracy.json ] && python3 -c "
import json; d=json.load(open('$OUT/e2e-accuracy.json'))
for k, r in d['runs'].items(): print('accuracy', k, {x: r.get(x) for x in ('max_abs_diff', 'mean_abs_diff', 'tolerance', 'passed', 'error')})"
[ -f "$OUT"/e2e-serve.json ] && python3 -c "
import json; d=json.load(open('$OUT/e2e-serve.json'))
print('serve passed', d['passed'], 'responses', d['responses'], '/', d['expected'], 'errors', len(d['errors']),
      {k: (round(d[k]['ttft_ms']['p50'], 1), round(d[k]['tpot_ms']['p50'], 2)) for k in ('completion', 'chat') if k in d}, '(TTFT p50 ms, TPOT p50 ms)')"
cat "$OUT"/throughput-*.md 2>/dev/null
# the exit status says whether every step passed (it was cat's: 1 whenever no throughput ran)
for s in $STEPS; do [ "${RC[$s]}" = 0 ] || exit 1; done
exit 0
