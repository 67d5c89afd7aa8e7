# Two entry points on a fresh clone:
#   make pipeline   set up .venv, then run the whole DVC pipeline on the built-in default (offline)
#   make test       set up .venv, then run the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1

.PHONY: setup pipeline test

setup: $(VENV)/.installed

# torch is installed first and pinned: the CPU wheel of 2.13.0. On a GPU machine install the CUDA
# build of torch 2.13.0 into the venv before `make setup` and it is kept.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

pipeline: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

test: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest $(PYTEST_ARGS)
