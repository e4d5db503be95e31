# aiworker: two commands matter. `make run` sets up and starts the node; `make test` runs every test.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint docs bench clean system-deps

# scripts/install.sh is the one install, the image's too (Dockerfile): it makes the venv and
# pip-installs the package into it (editable, with the test extras, here).
$(STAMP): pyproject.toml scripts/install.sh
	PYTHON=$(PY) sh scripts/install.sh --venv $(VENV) --editable --extras test
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/aiworker serve --config config/aiworker.yaml

system-deps:
	@sh scripts/system-deps.sh

test: $(STAMP) system-deps
	$(BIN)/ruff check aiworker tests bench docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir build/site
	$(BIN)/pytest -ra --durations=25 -n 2 --dist loadfile tests; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

lint: $(STAMP)
	$(BIN)/ruff check aiworker tests bench docs

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir build/site

bench: $(STAMP) system-deps
	$(BIN)/python bench/receive.py

clean:
	rm -rf $(VENV) var build *.egg-info
