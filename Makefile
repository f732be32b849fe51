# `make demo` and `make test` each set themselves up: they use the active virtual
# environment, or create .venv if none is active.
PYTHON ?= python3
ifdef VIRTUAL_ENV
VENV := $(VIRTUAL_ENV)
else
VENV := .venv
endif
BIN := $(VENV)/bin
STAMP := $(VENV)/.mamlkit-installed

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml requirements/constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c requirements/constraints.txt -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mamlkit train sinusoid-demo --out runs/sinusoid-demo
	$(BIN)/mamlkit eval runs/sinusoid-demo
	$(BIN)/mamlkit plot runs/sinusoid-demo

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest

bench: $(STAMP)
	PYTHON=$(BIN)/python bash benchmarks/install_peers.sh
	$(BIN)/python benchmarks/peers_speed.py --write BENCHMARKS.md

clean:
	rm -rf runs .pytest_cache .ruff_cache
