# ftkit: `make setup` once (or let any target do it), then `make recipe=NAME` / `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
FTKIT  := $(VENV)/bin/ftkit
recipe ?= tiny-mcot
ARGS   ?=
# MODEL=PATH: the recipe's weights folder (same as ARGS="--model.model_path PATH")
MODEL  ?=
# CPU machines take the CPU build of torch that pip finds for this exact pin; on a GPU machine
# `make setup TORCH=torch` keeps whatever CUDA build you already have.
TORCH  ?= torch==2.13.0
EXTRAS ?= dev

.DEFAULT_GOAL := recipe
.PHONY: recipe setup test test-fast lint data bench clean-venv

$(VENV)/.installed: pyproject.toml constraints-ci.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -c constraints-ci.txt -e ".[$(EXTRAS)]"
	touch $@

setup: $(VENV)/.installed

recipe: setup
	$(FTKIT) fit --config recipes/$(recipe).yaml $(if $(MODEL),--model.model_path $(MODEL)) $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(ARGS)

lint: setup
	$(PY) -m ruff check ftkit tests bench

data: setup
	$(FTKIT) data shapes --out data/shapes/train --n 2000 --seed 0 --overwrite
	$(FTKIT) data shapes --out data/shapes/eval --n 200 --seed 1 --overwrite

bench: setup
	$(PY) bench/bench_load.py
	$(PY) bench/bench_merge.py
	$(PY) bench/bench_train_cpu.py --wait-quiet 60

clean-venv:
	rm -rf $(VENV)
