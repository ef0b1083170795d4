# Digifeeds: `make demo` shows the pipeline end to end; `make test` runs the tests.
# Both set everything up on a fresh machine: a virtualenv in .venv and, where missing,
# the Debian packages of the sandbox's servers (OpenSSH, Pushgateway, Prometheus).

PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)

.PHONY: install system-packages demo sandbox stop test lint bench clean

$(VENV)/.installed: setup.py setup.cfg
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed system-packages

system-packages:
	@scripts/install-system-packages

demo: install
	$(BIN)/python -m sandbox demo

sandbox: install
	$(BIN)/python -m sandbox start

stop:
	$(BIN)/python -m sandbox stop

test: install
	scripts/run-tests

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: install
	$(BIN)/python bench/sftp_delivery.py --size-mb 200 --repeats 3
	$(BIN)/python bench/zip_volume.py
	$(BIN)/python bench/zip_memory.py
	$(BIN)/python bench/scale.py --sizes 1000 10000

clean: stop
	rm -rf .sandbox
