# GBX Entitlements: `make run` serves every endpoint and the portal locally; `make test` runs the whole suite.
PYTHON ?= python3
VENV := .venv
PORT ?= 8080
STAMP := $(VENV)/.installed
PIP := $(VENV)/bin/python -m pip install --quiet --disable-pip-version-check

.PHONY: install browser run test lint openapi bench clean

# The runner client (gbx) is installed editable: it holds the seal format the service shares; its dependencies are pinned in requirements.txt.
$(STAMP): requirements.txt requirements-dev.txt client/pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "GBX Entitlements needs Python 3.11 or newer (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -r requirements-dev.txt
	$(PIP) --no-deps -e ./client
	@touch $@

install: $(STAMP)

# The browser tests drive Debian's chromium through chromedriver, and the QR code tests render with rsvg-convert (installed with apt-get when missing).
browser:
	@bash tools/ensure-browser.sh

run: $(STAMP)
	$(VENV)/bin/python -m shared.local serve --port $(PORT)

# Two workers, each with its own emulator, KMS test server and (for the portal) browser; a file's tests stay together.
# Then the tests of hundreds of concurrent runners (marked `alone`), with nothing else on the machine: beside another
# worker's tests, two Java emulators and 200 clients on 2 cores measure the machine, not the service.
test: $(STAMP) browser
	$(VENV)/bin/python -m pytest -n 2 --dist loadfile -m "not alone"
	$(VENV)/bin/python -m pytest -m alone

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

openapi: $(STAMP)
	$(VENV)/bin/python -m shared.openapi > openapi.json

bench: $(STAMP)
	$(VENV)/bin/python -m bench

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache
