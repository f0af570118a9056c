# cspine-screener: `make run` starts the node, `make test` checks and tests everything.
# Each target creates .venv and installs what it needs on first use (Python 3.11, 3.12 or 3.13).
#   make run        demo engines (built once, from synthetic data) + `screener serve`
#   make check      ruff (lint + format check) and mypy
#   make test       make check, then the whole test suite
#   make test-fast  the tests not marked slow (no engine builds, no fresh-venv install)
#   make bench      engine backends' speed on this machine
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-fast check install demo-engines demo bench samples clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 13))' 2>/dev/null || \
		{ echo "error: $(PYTHON) is not Python 3.11, 3.12 or 3.13 (e.g. make PYTHON=python3.12 ...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)

# The node alone is `pip install .`; the trainer and the test tools come with the extras.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --disable-pip-version-check -q -e '.[trainer,test]'
	@touch $(STAMP)

install: $(STAMP)

check: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: check
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

demo-engines: $(STAMP)
	$(BIN)/python -m trainer.demo --engines engines --config config.toml

run: $(STAMP) demo-engines
	@echo "status page: http://127.0.0.1:8080/ ([http] in config.toml); 'make demo' in another terminal sends a study"
	$(BIN)/screener serve --config config.toml

demo: $(STAMP)
	$(BIN)/screener demo --config config.toml

bench: $(STAMP)
	$(BIN)/python -m bench.engines

samples: $(STAMP)
	$(BIN)/python -m screener.dicom.samples

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
