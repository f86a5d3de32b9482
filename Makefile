# `make run` runs the main job, `make test` the whole test suite. Both create or reuse .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch==2.13.0 is the CPU build; pinning it keeps pip from pulling a CUDA build.
	$(PY) -m pip install --quiet "torch==2.13.0" -e ".[dev]"
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m workbench experiment

test: $(STAMP)
	$(PY) -m ruff check workbench tests benchmarks
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/adapters.py
