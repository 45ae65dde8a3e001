# Conveyor: `make run` starts it on the embedded default, `make test` runs every check.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PG_BENCH_URL ?= postgresql://postgres@127.0.0.1:5432/postgres

.PHONY: install run test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

run: install
	$(BIN)/conveyor up

lint: install
	$(BIN)/ruff check src tests
	$(BIN)/mypy

test: install lint
	$(BIN)/pytest

bench: install
	$(BIN)/conveyor bench --tasks 20000 --json
	$(BIN)/conveyor bench --tasks 50000 --database $(PG_BENCH_URL) --claim-scale 1000000 --json
	$(BIN)/conveyor bench-api --database $(PG_BENCH_URL) --json
	$(BIN)/conveyor bench-ingest --database $(PG_BENCH_URL) --files 2000 --json

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
