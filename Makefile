# Targets named in the README. The virtual environment is made on first use; torch is pinned and installed
# first because an unpinned torch resolves to the CUDA build (gigabytes).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING := false

.PHONY: install demo stack stack-down test test-slow lint bench clean

# A line per step and pip's own output (what it collects, downloads and installs): minutes of work, never silent.
$(STAMP): pyproject.toml
	@echo "==> [1/4] virtual environment $(VENV)"
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@echo "==> [2/4] pip"
	$(BIN)/pip install --upgrade pip
	@echo "==> [3/4] torch==2.13.0 (the largest download)"
	$(BIN)/pip install torch==2.13.0
	@echo "==> [4/4] invdpo and its service and dev dependencies (editable)"
	$(BIN)/pip install -e '.[service,dev]'
	touch $(STAMP)
	@echo "==> installed: $(VENV)"

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m services.demo

# The whole service as processes on this machine, no Docker (services/stack.py; README "The whole service on this
# machine"). STACK_ARGS: e.g. --serve NAME,NAME@ALIAS.
stack: $(STAMP)
	$(BIN)/python -m services.stack up $(STACK_ARGS)

stack-down:
	$(BIN)/python -m services.stack down

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
	! test -f .stack/state.json || $(BIN)/python -m services.stack down  # a running stack first
	rm -rf $(VENV) demo-out runs .stack
