# Set-up and checks for zerorl. Every target creates and reuses .venv; a second run installs nothing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# On this project's CPU machines torch 2.13.0 is a local CPU build; users with GPUs get their own
# CUDA build through the loose `torch>=2.4` requirement in pyproject.toml.
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed

.PHONY: install train test lint bench clean jemalloc

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Torch first, so that nothing that depends on it pulls a multi-GB CUDA build.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	@$(MAKE) --no-print-directory jemalloc
	touch $(STAMP)

# Best effort, as root on Debian/Ubuntu: jemalloc, which the zerorl command runs on where it finds it
# (zerorl/allocator.py: ~5-30% shorter steps, up to 15% less memory). Not on PyPI; without it zerorl runs on
# glibc's malloc. NO_JEMALLOC=1 skips.
jemalloc:
	@if [ -z "$(NO_JEMALLOC)" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	    && ! (ls /usr/lib/*/libjemalloc.so.2 || ls /usr/lib/libjemalloc.so.2) >/dev/null 2>&1; then \
	  echo "installing libjemalloc2 (apt-get; NO_JEMALLOC=1 skips)"; \
	  timeout 300 apt-get install -y -qq libjemalloc2 >/dev/null 2>&1 \
	    || (timeout 300 apt-get update -qq >/dev/null 2>&1 && timeout 300 apt-get install -y -qq libjemalloc2 >/dev/null 2>&1) \
	    || echo "libjemalloc2 not installed: zerorl runs on glibc's malloc"; \
	fi

install: $(STAMP)

train: $(STAMP)
	$(BIN)/zerorl train $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check zerorl tests benchmarks

test: lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build *.egg-info
