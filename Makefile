# mecsplit: `make demo` runs the full demo, `make test` the test suite; both set up a fresh machine first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mecsplit-installed

.PHONY: setup system venv models demo test test-fast lint format clean-venv

setup: system venv

# System packages and services (Docker engine, Mininet, tc tools); only acts where it is root.
system:
	@bash scripts/setup-system.sh

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@if [ -e /usr/include/libnetfilter_queue/libnetfilter_queue.h ]; then $(BIN)/pip install -q -e '.[nfqueue]'; fi
	@touch $@

models: venv
	$(BIN)/mecsplit models prepare

demo: setup
	$(BIN)/mecsplit demo

test: setup
	$(BIN)/pytest
	@echo "exactness again on MKL's generic code path (MKL_CBWR=COMPATIBLE; the project pins AVX2):"
	MKL_CBWR=COMPATIBLE $(BIN)/pytest -q -m "exactness and not slow"

test-fast: venv
	$(BIN)/pytest -m "not root and not docker and not mininet and not slow"

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean-venv:
	rm -rf $(VENV)
