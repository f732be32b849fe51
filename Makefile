# `make demo`, `make test`, `make test-fast` and `make docs` each set themselves up: they use the
# active virtual environment, or create .venv if none is active. Every install goes through
# requirements/constraints.txt (the torch pin).
PYTHON ?= python3
ifdef VIRTUAL_ENV
VENV := $(VIRTUAL_ENV)
else
VENV := .venv
endif
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
CONSTRAINTS := -c requirements/constraints.txt
# What each target needs, installed once per environment (again when pyproject.toml or the pins
# change): the demo mamlkit and its dependencies only; the tests also the test extra (pytest, ruff,
# hypothesis, MuJoCo) and the docs extra (MkDocs, mkdocstrings: the docs build is a test); the docs
# the docs extra only.
DEMO_STAMP := $(VENV)/.mamlkit-demo-installed
TEST_STAMP := $(VENV)/.mamlkit-test-installed
DOCS_STAMP := $(VENV)/.mamlkit-docs-installed

.PHONY: demo test test-fast lint docs bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(DEMO_STAMP): pyproject.toml requirements/constraints.txt | $(BIN)/python
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(CONSTRAINTS) -e .
	touch $@

$(TEST_STAMP): pyproject.toml requirements/constraints.txt | $(BIN)/python
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(CONSTRAINTS) -e ".[test,docs]"
	touch $@

$(DOCS_STAMP): pyproject.toml requirements/constraints.txt | $(BIN)/python
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(CONSTRAINTS) -e ".[docs]"
	touch $@

demo: $(DEMO_STAMP)
	$(BIN)/mamlkit train sinusoid-demo --out runs/sinusoid-demo
	$(BIN)/mamlkit eval runs/sinusoid-demo
	$(BIN)/mamlkit plot runs/sinusoid-demo

lint: $(TEST_STAMP)
	$(BIN)/ruff check src tests benchmarks examples

# The whole suite: what CI runs (.ci/run).
test: lint
	$(BIN)/python -m pytest

# Everything but the tests marked slow.
test-fast: lint
	$(BIN)/python -m pytest -m "not slow"

# The docs site with the API reference, into build/site (`$(BIN)/mkdocs serve` to browse it live).
docs: $(DOCS_STAMP)
	$(BIN)/mkdocs build --strict

bench: $(TEST_STAMP)
	PYTHON=$(BIN)/python bash benchmarks/install_peers.sh
	$(BIN)/python benchmarks/peers_speed.py --write BENCHMARKS.md

clean:
	rm -rf runs build/site .pytest_cache .ruff_cache
