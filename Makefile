# aiworker: two commands matter. `make run` sets up and starts the node; `make test` runs every test.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench clean system-deps

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/aiworker serve --config config/aiworker.yaml

system-deps:
	@sh scripts/system-deps.sh

test: $(STAMP) system-deps
	$(BIN)/ruff check aiworker tests bench
	$(BIN)/pytest -ra tests; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

lint: $(STAMP)
	$(BIN)/ruff check aiworker tests bench

bench: $(STAMP) system-deps
	$(BIN)/python bench/receive.py

clean:
	rm -rf $(VENV) var build *.egg-info
