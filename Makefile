# Two commands set everything up on a fresh machine:
#   make run   - create .venv, install metagrad, train+evaluate MAML on sinusoid regression (short default)
#   make test  - create .venv, install dev dependencies, run the test suite
#   make docs  - build the API reference site into site/ (mkdocs --strict: a broken reference fails)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: run test lint docs bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned to the CPU build that lies on this machine's disk; installed first so that
# the project's `torch>=2.13` is already satisfied and nothing larger is downloaded.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

run: $(VENV)/.installed
	$(BIN)/metagrad train sinusoid --preset quick --out runs/sinusoid-quick-$$(date +%Y%m%d-%H%M%S)

# -n 2: one pytest-xdist worker per core of the CI machine (tests/conftest.py gives each one
# thread); worksteal balances the few long learning tests
test: $(VENV)/.installed
	$(BIN)/python -m pytest -q -n 2 --dist worksteal

lint: $(VENV)/.installed
	$(BIN)/ruff check metagrad tests benchmarks examples tools

# the docs tools (mkdocs, mkdocstrings) come with the dev extra: `make test` checks the build too
docs: $(VENV)/.installed
	$(BIN)/mkdocs build --strict --site-dir site

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/bench_sinusoid.py

clean:
	rm -rf $(VENV) runs site .pytest_cache .ruff_cache
