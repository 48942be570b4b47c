PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python server.py serve

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --durations=20

bench: $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/python bench/run_all.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

# Not the data directory: it holds the keys, the users, the audit events not
# yet in the sink and, with the default sink, the audit trail itself.
clean:
	rm -rf $(VENV) .pytest_cache
