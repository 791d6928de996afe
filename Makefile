# Set-up and checks for zerorl. Every target creates and reuses .venv; a second run installs nothing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# On this project's CPU machines torch 2.13.0 is a local CPU build; users with GPUs get their own
# CUDA build through the loose `torch>=2.4` requirement in pyproject.toml.
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed

.PHONY: install train test lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Torch first, so that nothing that depends on it pulls a multi-GB CUDA build.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(BIN)/zerorl train $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check zerorl tests benchmarks

test: lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build *.egg-info
