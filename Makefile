# Two commands do all the set-up on a fresh machine with Python 3.11 and pip:
#   make run    create .venv, install, run the whole pipeline on the tiny profile
#   make test   create .venv, install, run the tests
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN     = $(VENV)/bin
ARGS   ?=

.PHONY: setup run test lint bench clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip
	# torch first, pinned: the CPU wheel on disk; anything looser pulls a CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[train,kfp,airflow,dev]'
	touch $@

run: setup
	$(BIN)/coaflow run $(ARGS)

test: setup
	$(BIN)/python -m pytest $(ARGS)

lint: setup
	$(BIN)/ruff check src tests bench components

clean:
	rm -rf work
