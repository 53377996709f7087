#!/usr/bin/env bash
# Recovery experiments on a GPU host without network (vLLM is not needed):
#   TEACHER=SmolLM2-135M-Instruct.Q4_1.gguf DATA=folder-with-wiki_calib.txt-and-wiki_eval.txt \
#   DOMAINS=folder-with-code.txt-and-dialogue.txt bash benchmarks/offline_host/recovery.sh
# DOMAINS is what `python benchmarks/domain_texts.py --out DIR` writes (on a machine with PyPI).
# PARTS (default: all four, in this order):
#   students       the one-shot students (SparseGPT-joint: all linears 2:4, --dense-layers auto:10),
#                  evaluated with the dense teacher on every text (benchmarks/recovery_smollm2.py --modes)
#   recipe         each RUNS item recovered by `vllm-sparse24 recover` with its defaults (the README
#                  command, --max-minutes 10), one process per GPU at a time, evaluated on every text
#   fsdp           the all-2:4 student recovered across 2 GPUs (torchrun, recover --fsdp); needs 2 GPUs
#   blocks-memory  blocks mode at the Llama-3-8B layer shape, 2 and 4 layers of random weights, one GPU:
#                  peak memory and time per layer (benchmarks/recovery_blocks_memory.py)
# then one merged results JSON + PNG + markdown table of every recipe / fsdp run in $OUT.
# Environment:
#   SCHEMES     the students' schemes, each through students and recipe (default "int8"; "int8 w4a8": int8 and
#               w4a8 side by side, each recovered with the same options and budget)
#   RUNS        "student:mode ..." for recipe (default "all-sparse:global auto10:global"; blocks: student:blocks)
#   MINUTES     --minutes of every recovery run (default: recover's own, 10)
#   WORK        where students and recovered checkpoints stay (default /tmp/sparse24-recovery)
#   OUT         logs, merged results, the blocks-memory JSON (default /tmp/sparse24-out)
#   WHEELS_DIR  wheels installed first, ahead of the host's packages (default .whl): gguf for a .gguf
#               teacher, and compressed-tensors with its pydantic stack where missing
#   EXTRA_ARGS  more recovery_smollm2.py arguments for every run (e.g. --recover-args '--gen-batch-size 1024')
# Time on one H100/H200: students ~5 min; each recipe run ~12 min (10 of recovery, compression reused,
# evaluations); fsdp ~12 min; blocks-memory ~5 min.
set -u -o pipefail
OUT=${OUT:-/tmp/sparse24-out}; mkdir -p "$OUT"
WORK=${WORK:-/tmp/sparse24-recovery}; mkdir -p "$WORK"
PARTS=${PARTS:-students recipe fsdp blocks-memory}
RUNS=${RUNS:-all-sparse:global auto10:global}
SCHEMES=${SCHEMES:-int8}
: "${TEACHER:?TEACHER=teacher .gguf file or HF folder}" "${DATA:?DATA=folder with wiki_calib.txt and wiki_eval.txt}"
: "${DOMAINS:?DOMAINS=folder with code.txt and dialogue.txt (python benchmarks/domain_texts.py --out DIR)}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
wheels=${WHEELS_DIR:-.whl}
if ls "$wheels"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/recovery_site \
    "$wheels"/*.whl || exit 1
  export PYTHONPATH=/tmp/recovery_site:$PWD:${PYTHONPATH:-}
else
  export PYTHONPATH=$PWD:${PYTHONPATH:-}
fi
ngpu=$(python3 -c "import torch; print(torch.cuda.device_count())") || exit 1
[ "$ngpu" -ge 1 ] || { echo "no CUDA GPU"; exit 1; }
threads=$(( $(nproc) / ngpu )); [ "$threads" -ge 1 ] || threads=1
bench() {  # recovery_smollm2.py with the texts, the budget and the extra arguments of every run
  python3 benchmarks/recovery_smollm2.py --teacher "$TEACHER" --calib "$DATA/wiki_calib.txt" \
    --eval-text "$DATA/wiki_eval.txt" --domain "code=$DOMAINS/code.txt" --domain "dialogue=$DOMAINS/dialogue.txt" \
    --threads "$threads" ${MINUTES:+--minutes "$MINUTES"} ${EXTRA_ARGS:-} "$@"
}
run_dir() {  # a run's own --out, sharing the students made by the students part
  mkdir -p "$WORK/$1" "$WORK/base/students" && ln -sfn "$WORK/base/students" "$WORK/$1/students"
}
tag() {  # a run's name: student, scheme (int8 runs keep the names of before the other schemes), mode
  if [ "$2" = int8 ]; then echo "$1-$3"; else echo "$1-$2-$3"; fi
}
echo "== $ngpu GPU(s), parts: $PARTS"
rc=0
for part in $PARTS; do
  case $part in
    students)
      for scheme in $SCHEMES; do
        echo "== students ($scheme)"
        log="$OUT/recovery-students$([ "$scheme" = int8 ] || echo "-$scheme").log"
        CUDA_VISIBLE_DEVICES=0 bench --out "$WORK/base" --modes --scheme "$scheme" >"$log" 2>&1 || rc=1
        tail -12 "$log"
      done ;;
    recipe)
      i=0; declare -A busy=()
      for scheme in $SCHEMES; do
        for run in $RUNS; do
          student=${run%%:*} mode=${run##*:} gpu=$(( i % ngpu )) name=$(tag "${run%%:*}" "$scheme" "${run##*:}")
          [ -n "${busy[$gpu]:-}" ] && { wait "${busy[$gpu]}" || rc=1; }  # one run per GPU at a time
          run_dir "$name"
          echo "== recipe $student $scheme $mode on GPU $gpu"
          CUDA_VISIBLE_DEVICES=$gpu bench --out "$WORK/$name" --students "$student" --modes "$mode" --scheme "$scheme" \
            >"$OUT/recovery-$name.log" 2>&1 &
          busy[$gpu]=$!; i=$((i + 1))
        done
      done
      for p in "${busy[@]}"; do wait "$p" || rc=1; done
      for scheme in $SCHEMES; do
        for run in $RUNS; do
          name=$(tag "${run%%:*}" "$scheme" "${run##*:}")
          echo "== $name: $(grep -E 'perplexity .* -> |Error|error:' "$OUT/recovery-$name.log" | tail -2)"
        done
      done ;;
    fsdp)
      if [ "$ngpu" -lt 2 ]; then echo "== fsdp: skipped, $ngpu GPU"; continue; fi
      run_dir all-sparse-global-x2
      echo "== fsdp: all-sparse global across 2 GPUs"
      CUDA_VISIBLE_DEVICES=0,1 bench --out "$WORK/all-sparse-global-x2" --students all-sparse --modes global \
        --processes 2 >"$OUT/recovery-all-sparse-global-x2.log" 2>&1 || rc=1
      grep -E 'perplexity .* -> |Error|error:' "$OUT/recovery-all-sparse-global-x2.log" | tail -2 ;;
    blocks-memory)
      echo "== blocks-memory: Llama-3-8B layer shape, 2 and 4 layers"
      CUDA_VISIBLE_DEVICES=0 python3 benchmarks/recovery_blocks_memory.py --shape llama3-8b --layers 2 4 \
        --out "$OUT" >"$OUT/recovery-blocks-memory.log" 2>&1 || rc=1
      tail -25 "$OUT/recovery-blocks-memory.log" ;;
    *) echo "unknown part $part"; rc=1 ;;
  esac
done
jsons=$(ls "$WORK"/*/recovery-smollm2-*.json 2>/dev/null)
[ -n "$jsons" ] && { python3 benchmarks/recovery_smollm2.py --out "$OUT" --merge $jsons || rc=1; }
exit $rc
