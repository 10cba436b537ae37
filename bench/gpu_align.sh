#!/usr/bin/env bash
# Self-alignment pretraining on a lent GPU, in one device call that ends on its own (ALIGN_BUDGET seconds, default
# 520), stages in order of value, each writing what it has into $OUT before the next starts:
#   1. hf-continual pretrain recipes/pretrain_gpu.yaml from .gpu/model (its task-0 state is computed afterwards
#      on the developer machine: `hf-continual pretrain ... --consolidate`; K-FAC factors do not fit the return),
#      then bench/aligned_delta.py pack: the weights as an fp16 difference from the start in 15 MiB parts;
#   2. bench/el_quality.py on the aligned model: untouched and trained alone (`all`), the three tasks, test
#      splits, full dictionaries (MeSH too);
#   3. bench/pretrain_curve.py: zero-shot dev acc@1 of the snapshots (the learning curve);
#   4. tests/test_cuda.py.
# Results: $OUT/results.tar.gz (remade after each stage). Prepare with `bash bench/gpu_prepare.sh`, then
# run(command="bash bench/gpu_align.sh", carry=[".gpu"], timeout_s=560); here, `python bench/aligned_delta.py
# unpack ...` (README "Self-alignment pretraining" gives the commands). ALIGN_SMOKE=1 runs every stage on
# this CPU at toy sizes (checks the script, measures nothing).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET="${ALIGN_BUDGET:-520}"
left() { echo $((BUDGET - ($(date +%s) - START))); }
PY="${PY:-python3}"
OUT="${OUT:-bench/results/gpu_align}"
WORK="${ALIGN_WORK:-/tmp/align}"
mkdir -p "$OUT" "$WORK"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
SMOKE="${ALIGN_SMOKE:-0}"
if [ "$SMOKE" != 1 ] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "no CUDA device (ALIGN_SMOKE=1 runs the stages on the CPU at toy sizes)"
  exit 0
fi
if [ "$SMOKE" != 1 ] && [ -d .gpu/wheels ] && ls .gpu/wheels/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_site \
    .gpu/wheels/*.whl || exit 1
  export PYTHONPATH="/tmp/gpu_site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
DATA=.gpu/data
BASE=.gpu/model
RUN="$WORK/aligned"
ELQ="$WORK/el_quality"
CURVE="$WORK/curve"
mkdir -p "$ELQ" "$CURVE"
"$PY" bench/device_info.py >"$WORK/device.json"
cat "$WORK/device.json"
bundle() {  # everything small so far, in one file (the return takes 8 files at most)
  tar -czf "$OUT/results.tar.gz.tmp" -C "$WORK" --exclude=aligned --exclude='*.safetensors' . &&
    mv "$OUT/results.tar.gz.tmp" "$OUT/results.tar.gz"
}
stage() { echo "== $1 (t=$(($(date +%s) - START)) s, $(left) s left)"; }

recipe=recipes/pretrain_gpu.yaml
pre_sets=(--set "data_dir=$DATA" --set "model=$BASE" --set continual_state=null)
elq_sets=(--set training.use_cpu=false)
elq_limits=()
curve_limits=()
if [ "$SMOKE" = 1 ]; then
  recipe=recipes/pretrain_quick.yaml
  pre_sets+=(--set save_steps=10)
  elq_sets=()
  elq_limits=(--max-train-mentions 48 --max-eval-mentions 48 --no-full)
  curve_limits=(--steps 10)
fi

stage "1/4 pretrain $recipe"
rm -rf "$RUN"
timeout $(($(left) - 150)) "$PY" -m hf_continual.cli pretrain "$recipe" --output-dir "$RUN" --no-progress \
  "${pre_sets[@]}" 2>&1 | tee "$WORK/pretrain.log" | grep -vE "^\{'loss'"
model="$RUN"
if [ ! -f "$RUN/pretrain_info.json" ]; then  # cut off: the last snapshot is a usable, smaller result
  last=$(ls -d "$RUN"/snapshots/step-* 2>/dev/null | sort -t- -k2 -n | tail -1)
  echo "pretraining did not finish; packing ${last:-nothing}"
  model="$last"
fi
if [ -n "$model" ]; then
  "$PY" bench/aligned_delta.py pack --base "$BASE" --model "$model" --out "$OUT" 2>&1 | tee "$WORK/pack.log"
fi
bundle

stage "2/4 el_quality of the aligned model"
if [ -n "$model" ]; then
  for task in ncbi-disease bc5cdr-disease bc5cdr-chemical; do
    [ "$(left)" -lt 60 ] && { echo "skipped $task: out of time"; continue; }
    timeout $(($(left) - 30)) "$PY" bench/el_quality.py --data-dir "$DATA" --set "model=$model" "${elq_sets[@]}" \
      --out "$ELQ" --tasks "$task" --configs untouched all --full-chemical untouched all "${elq_limits[@]}" \
      2>&1 | tee -a "$WORK/el_quality.log" | grep -vE "^\{'loss'|it/s\]"
    bundle
  done
fi

stage "3/4 learning curve (zero-shot dev acc@1 of the snapshots)"
if [ -d "$RUN/snapshots" ] && [ "$(left)" -gt 60 ]; then
  timeout $(($(left) - 30)) "$PY" bench/pretrain_curve.py --run "$RUN" --base "$BASE" --data-dir "$DATA" \
    --tasks ncbi-disease bc5cdr-disease bc5cdr-chemical --out "$CURVE" "${curve_limits[@]}" 2>&1 |
    tee "$WORK/curve.log"
  bundle
fi

stage "4/4 CUDA tests"
if [ "$SMOKE" != 1 ] && [ "$(left)" -gt 40 ]; then
  timeout $(($(left) - 10)) "$PY" -m pytest tests/test_cuda.py -rs -p no:cacheprovider 2>&1 | tee "$WORK/test_cuda.log" |
    tail -5
  bundle
fi
stage "done"
ls -la "$OUT"
