# cspine-screener: `make run` starts the node, `make test` runs the tests.
# Both create .venv and install the project on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test install demo-engines bench samples clean

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (Python 3.11 is required)"; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --disable-pip-version-check -q -e '.[trainer,test]'
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo-engines: $(STAMP)
	$(BIN)/python -m trainer.demo --engines engines --config config.toml

run: $(STAMP) demo-engines
	@echo "status page: http://127.0.0.1:8080/ ([http] in config.toml); 'make demo' in another terminal sends a study"
	$(BIN)/screener serve --config config.toml

.PHONY: demo
demo: $(STAMP)
	$(BIN)/screener demo --config config.toml

bench: $(STAMP)
	$(BIN)/python -m bench.engines

samples: $(STAMP)
	$(BIN)/python -m screener.dicom.samples

clean:
	rm -rf $(VENV) var .pytest_cache
