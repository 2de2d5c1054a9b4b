# GBX Entitlements: `make run` serves every endpoint locally; `make test` runs the whole suite.
PYTHON ?= python3
VENV := .venv
PORT ?= 8080
STAMP := $(VENV)/.installed

.PHONY: install run test openapi bench clean

$(STAMP): requirements.txt requirements-dev.txt client/pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "GBX Entitlements needs Python 3.11 or newer (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -e ./client
	@touch $@

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/python -m shared.local serve --port $(PORT)

test: $(STAMP)
	$(VENV)/bin/python -m pytest

openapi: $(STAMP)
	$(VENV)/bin/python -m shared.openapi > openapi.json

bench: $(STAMP)
	$(VENV)/bin/python bench/contention.py

clean:
	rm -rf $(VENV) build .pytest_cache
