# make demo   builds the environment and runs the demo sweep on the embedded tiny model
# make test   builds the environment and runs the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: env demo test lint clean

env: $(STAMP)

# torch goes in first and pinned, so that a CPU machine takes its local CPU wheel rather
# than pulling a multi-GB CUDA build as another package's dependency.
$(STAMP): pyproject.toml constraints/quantize.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints/quantize.txt torch
	$(PY) -m pip install -q -c constraints/quantize.txt -e '.[dev]'
	touch $(STAMP)

demo: env
	$(PY) run.py -m +sweep=demo

test: env
	$(PY) -m pytest

lint: env
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf outputs mlflow.db mlartifacts
