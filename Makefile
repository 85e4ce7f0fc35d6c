# The project's two commands: `make serve` and `make test`. Everything they need
# is installed here, into .venv at the root; nothing is installed by hand.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
REPO := model_repository
PORT ?= 8080
# Optional real weights, e.g. CHECKPOINTS="inception_v4=/data/iv4.safetensors";
# PRECISION=fp16 exports half-precision networks (for GPUs).
# HUB=auto|1|0: timm's published checkpoints. `make serve` defaults to auto (a short check;
# random weights, with a message, when the hub does not answer); every other target to 0,
# so that `make test` exports the same deterministic networks on every machine.
CHECKPOINTS ?=
HUB ?=
HUB_DEFAULT = 0
serve: HUB_DEFAULT = auto
PRECISION ?=

.PHONY: all venv backend repository serve test check bench bench-gateway bench-overload clean

all: test

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) is required"; exit 1; }
	# Debian tools the deployment tests run for real (Prometheus, promtool, Alertmanager,
	# amtool, docker-compose, kubectl).
	command -v promtool >/dev/null && command -v prometheus >/dev/null && command -v docker-compose >/dev/null && \
	  command -v prometheus-alertmanager >/dev/null && command -v amtool >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    prometheus prometheus-alertmanager docker-compose; }
	command -v kubectl >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubectl; }
	# Debian's browser, which Playwright drives in tests/browser (its own download cannot work here).
	command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	  --no-install-recommends chromium; }
	# Debian tools that build Triton's PyTorch backend (embedded/backend.py says why each).
	command -v cmake >/dev/null && command -v g++ >/dev/null && command -v patchelf >/dev/null && \
	  test -f /usr/include/rapidjson/document.h && test -f /usr/src/googletest/CMakeLists.txt || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    cmake g++ make rapidjson-dev googletest patchelf; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch and torchvision first, pinned, so that nothing pulls another build.
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[gateway,models,reference,embedded,dev]'
	touch $@

# Triton's PyTorch backend, built against this venv's torch; cached under build/backends,
# so this rebuilds only when the sources, torch or the flags change.
backend: $(STAMP)
	$(BIN)/python -m embedded.backend

repository: $(STAMP)
	$(BIN)/python -m inception.export --repository $(REPO) \
		$(foreach c,$(CHECKPOINTS),--checkpoint $(c)) --hub $(or $(HUB),$(HUB_DEFAULT)) $(if $(PRECISION),--precision $(PRECISION),)

serve: backend repository
	PORT=$(PORT) $(BIN)/python -m embedded.serve --repository $(REPO)

test: backend repository
	$(BIN)/python -m ruff check .
	$(BIN)/python -m pytest

# The quick loop while editing (under a minute): lint, format, types, and the tests that
# start no server and build no whole network. `make test` is the full suite.
check: repository
	$(BIN)/python -m ruff check .
	$(BIN)/python -m ruff format --check .
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest -q -m "not integration and not slow"

bench: backend repository
	$(BIN)/python -m bench.models --repository $(REPO)

bench-gateway: backend repository
	$(BIN)/python -m bench.gateway --repository $(REPO)

# Goodput and latency past capacity, with and without admission control, and a 10-minute
# memory soak (about 16 minutes in all).
bench-overload: backend repository
	$(BIN)/python -m bench.overload --repository $(REPO)

clean:
	rm -rf $(VENV) build $(REPO)/*/1 $(REPO)/*/labels.txt $(REPO)/*/configs
