# The two commands of the README, each installing what it needs on first use:
#   make demo   train and evaluate PMM on the embedded synthetic data
#   make test   the whole test suite (lint and layering included), on both
#               cores (pytest-xdist), the slowest tests listed at the end
#   make test-fast   the fast tier: everything not marked slow
# The virtual environment is built from requirements.txt (the pinned, tested
# stack) plus the plugin itself (editable), and rebuilt when either changes.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast lint venv

# one worker per core; a file's tests stay on one worker (module fixtures)
WORKERS ?= 2
XDIST   := -n $(WORKERS) --dist loadfile

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/main.py --config-file configs/pmm_demo.yaml

test: $(STAMP)
	$(PY) -m pytest -q $(XDIST) --durations=15 tests $(ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q $(XDIST) -m "not slow" tests $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check pmm_torchreid scripts tests
	$(VENV)/bin/lint-imports
