# Newcomer commands: `make demo` runs the main job, `make test` runs the test suite.
# Both create .venv and install the package with plain pip from pyproject.toml on first use; the tests need the
# `lmms` extra (lmms-eval, ~2.4 GB) for the end-to-end lmms-eval plugin run.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: install demo test selection-time clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,lmms]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m vtprune.demo

test: install
	$(PY) -m pytest -q

selection-time: install
	$(PY) eval/selection_time.py --json selection_time.json

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
