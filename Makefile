# Targets named in the README. The virtual environment is made on first use; torch is pinned and installed
# first because an unpinned torch resolves to the CUDA build (gigabytes).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING := false

.PHONY: install demo test test-slow lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[service,dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m services.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Each benchmark prints a table and writes benchmarks/results/<name>.json; memory.py also runs data_memory.py.
bench: $(STAMP)
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/inversion.py
	$(BIN)/python benchmarks/memory.py
	$(BIN)/python benchmarks/alignment.py --quick
	$(BIN)/python benchmarks/serving.py

clean:
	rm -rf $(VENV) demo-out runs
