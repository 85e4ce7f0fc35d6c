# The project's two commands: `make serve` and `make test`. Everything they need
# is installed here, into .venv at the root; nothing is installed by hand.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CPU_REPO := build/model_repository_cpu
PORT ?= 8080
# Optional real weights, e.g. CHECKPOINTS="inception_v4=/data/iv4.safetensors" or HUB=1.
CHECKPOINTS ?=
HUB ?=

.PHONY: all venv repository serve test bench bench-gateway clean

all: test

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) is required"; exit 1; }
	# Debian tools the deployment tests run for real (Prometheus, promtool, docker-compose, kubectl).
	command -v promtool >/dev/null && command -v prometheus >/dev/null && command -v docker-compose >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    prometheus docker-compose; }
	command -v kubectl >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubectl; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch and torchvision first, pinned, so that nothing pulls another build.
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[gateway,models,reference,embedded,dev]'
	touch $@

repository: $(STAMP)
	$(BIN)/python -m inception.export --flavour both --cpu-repository $(CPU_REPO) \
		$(foreach c,$(CHECKPOINTS),--checkpoint $(c)) $(if $(HUB),--hub,)

serve: repository
	PORT=$(PORT) $(BIN)/python -m embedded.serve --repository $(CPU_REPO)

test: repository
	$(BIN)/python -m ruff check .
	$(BIN)/python -m pytest

bench: repository
	$(BIN)/python -m bench.models --repository $(CPU_REPO)

bench-gateway: repository
	$(BIN)/python -m bench.gateway --repository $(CPU_REPO)

clean:
	rm -rf $(VENV) build model_repository/*/1 model_repository/*/labels.txt
