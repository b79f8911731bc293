# Quickstart: `make demo` trains the embedded demo on 2 CPU processes; `make test` runs the test suite.
# Both create .venv with the CPU build of torch 2.13.0 and the project on first use.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test,lora]" -c constraints.txt
	touch $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m ftloop.demo --nproc-per-node 2

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests

clean:
	rm -rf demo_run .pytest_cache
