#!/usr/bin/env bash
# Accuracy recovery of SmolLM2-135M (benchmarks/recovery_smollm2.py) on a GPU host without network:
# one process per (student, mode) run, spread round-robin over the host's GPUs, each with its own
# output folder; then one merged results JSON + PNG in $OUT. vLLM is not needed.
#   TEACHER=SmolLM2-135M-Instruct.Q4_1.gguf DATA=folder-with-wiki_calib.txt-and-wiki_eval.txt \
#     bash benchmarks/offline_host/recovery.sh
# Environment:
#   RUNS            "student:mode ..." (default: all-sparse and auto10, each in global and blocks mode)
#   MINUTES_GLOBAL  training minutes of a global-distillation run (default 7)
#   MINUTES_BLOCKS  training minutes of a blocks run (default 4)
#   WORK            where students and recovered checkpoints stay (default /tmp/sparse24-recovery)
#   WHEELS_DIR      wheels installed first, ahead of the host's packages (default .whl): gguf for a
#                   .gguf teacher, and compressed-tensors with its pydantic stack where missing
#   EXTRA_ARGS      more recovery_smollm2.py arguments for every run
set -u -o pipefail
OUT=${OUT:-/tmp/sparse24-out}; mkdir -p "$OUT"
WORK=${WORK:-/tmp/sparse24-recovery}; mkdir -p "$WORK"
RUNS=${RUNS:-all-sparse:global auto10:global all-sparse:blocks auto10:blocks}
: "${TEACHER:?TEACHER=teacher .gguf file or HF folder}" "${DATA:?DATA=folder with wiki_calib.txt and wiki_eval.txt}"
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
threads=$(( $(nproc) / $(echo $RUNS | wc -w) )); [ "$threads" -ge 1 ] || threads=1
echo "== $ngpu GPU(s), runs: $RUNS, $threads CPU threads each"
i=0; pids=()
for run in $RUNS; do
  student=${run%%:*} mode=${run##*:}
  minutes=${MINUTES_GLOBAL:-7}; [ "$mode" = blocks ] && minutes=${MINUTES_BLOCKS:-4}
  CUDA_VISIBLE_DEVICES=$(( i % ngpu )) python3 benchmarks/recovery_smollm2.py --teacher "$TEACHER" \
    --calib "$DATA/wiki_calib.txt" --eval-text "$DATA/wiki_eval.txt" --out "$WORK/$student-$mode" \
    --students "$student" --modes "$mode" --minutes "$minutes" --threads "$threads" ${EXTRA_ARGS:-} \
    >"$OUT/recovery-$student-$mode.log" 2>&1 &
  pids+=($!); i=$((i + 1))
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
for run in $RUNS; do
  echo "== ${run}: $(grep -E 'perplexity .* -> |Error|error:' "$OUT/recovery-${run%%:*}-${run##*:}.log" | tail -2)"
done
python3 benchmarks/recovery_smollm2.py --out "$OUT" --merge "$WORK"/*/recovery-smollm2-*.json || rc=1
exit $rc
