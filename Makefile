# MwT Hub — developer tasks. `make run` and `make test` are all a new clone needs.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Written after a successful install; rebuilt when pyproject.toml or constraints.txt change.
STAMP := $(VENV)/.mwt-hub-installed

.PHONY: venv run test lint typecheck format readme walkthrough clean

venv: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install -c constraints.txt -e ".[service,dev]"
	touch $@

run: venv
	$(BIN)/mwt serve

test: venv
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check .

typecheck: venv
	$(BIN)/mypy

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

readme: venv  # rewrite README.md's generated tables (tests/scripts/test_readme.py checks them)
	$(BIN)/python scripts/readme.py --write

walkthrough: venv  # rerun the README's service walk-through on a fresh registry and rewrite its output blocks
	$(BIN)/python scripts/walkthrough.py --write

clean:
	rm -rf .pytest_cache .ruff_cache build dist *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
