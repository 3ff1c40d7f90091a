# MwT Hub — developer tasks. `make run` and `make test` are all a new clone needs.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Written after a successful install; rebuilt when pyproject.toml or constraints.txt change.
STAMP := $(VENV)/.mwt-hub-installed

.PHONY: venv system-deps run test test-fast test-avx2 lint typecheck format readme walkthrough clean

venv: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install -c constraints.txt -e ".[service,dev]"
	touch $@

run: venv
	$(BIN)/mwt serve

# Chromium, wrk, redis-server (apt-get as root or with password-less sudo, else one line saying
# what to install), and a check that PostgreSQL and Redis answer. .ci/run calls it too.
system-deps:
	bash scripts/system-deps.sh

test: system-deps venv
	$(BIN)/python -m pytest -q

# A check before a commit, in a few minutes: every test directory, without the tests marked slow
# (real service processes, longer training runs, heavy exports) and without the API tests' second
# run on PostgreSQL (markers in pyproject.toml). The full suite stays `make test`, as in CI.
test-fast: system-deps venv
	$(BIN)/python -m pytest -q -m "not slow and not postgres"

# The tests of learning outcomes once more on PyTorch's and oneDNN's AVX2 kernels, as on a CPU
# without AVX-512: float sums round differently there, so training takes another trajectory.
test-avx2: venv
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 $(BIN)/python -m pytest -q -m training_outcome

lint: venv
	$(BIN)/ruff check .

typecheck: venv
	$(BIN)/mypy

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

readme: venv  # rewrite docs/'s generated tables (tests/scripts/test_readme.py checks them)
	$(BIN)/python scripts/readme.py --write

walkthrough: venv  # rerun docs/walkthrough.md on a fresh registry and rewrite its output blocks
	$(BIN)/python scripts/walkthrough.py --write

clean:
	rm -rf .pytest_cache .ruff_cache build dist *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
