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

.PHONY: all debian venv compat-prepare backend repository rollback serve test compat check bench bench-gateway bench-frontend bench-overload bench-hostile gpu-kit clean

all: test

venv: $(STAMP)

# Debian's tools, in one place and one apt-get: those the deployment tests run for real
# (Prometheus, promtool, Alertmanager, amtool, docker-compose, kubectl, caddy), the browser that
# Playwright drives in tests/browser (its own download cannot work here), and what builds
# Triton's PyTorch backend (embedded/backend.py says why each). Installs only what is missing.
DEBIAN_PACKAGES := prometheus prometheus-alertmanager docker-compose kubectl chromium caddy \
	cmake g++ make rapidjson-dev googletest patchelf
DEBIAN_CHECK := command -v promtool && command -v prometheus && command -v docker-compose && \
	command -v prometheus-alertmanager && command -v amtool && command -v kubectl && command -v chromium && \
	command -v caddy && \
	command -v cmake && command -v g++ && command -v patchelf && test -f /usr/include/rapidjson/document.h && \
	test -f /usr/src/googletest/CMakeLists.txt

debian:
	@( $(DEBIAN_CHECK) ) >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq --no-install-recommends $(DEBIAN_PACKAGES); }

$(STAMP): pyproject.toml Makefile | debian
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) is required"; exit 1; }
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

# Serves each MODEL's previous version again, its provenance with it (README.md, Runbook:
# "Rolling back weights"): MODEL=inception_v4, or several, comma-separated. Without MODEL it
# lists the versions each model keeps. A Triton polling the repository loads it at its
# next poll; TRITON_URL=host:port waits until that Triton serves it.
MODEL ?=
TRITON_URL ?=
comma := ,
rollback: $(STAMP)
	$(BIN)/python -m inception.rollback --repository $(REPO) $(subst $(comma), ,$(MODEL)) \
		$(if $(MODEL),,--list) $(if $(TRITON_URL),--triton-url $(TRITON_URL),)

serve: backend repository
	PORT=$(PORT) $(BIN)/python -m embedded.serve --repository $(REPO)

# Compose's model path (issue 20): the torch that deploy/models.Dockerfile pins, in
# .venv-compat, exports the repository into build/compat, Triton's PyTorch backend is built
# against it (build/backends-compat), and the embedded tritonserver serves that export,
# checked against the same torch in-process (tests/deploy/compat.py says what and why).
# Each step is skipped while its inputs are unchanged. `make test` prepares it and its
# suite runs tests/deploy/test_compat.py with the rest; `make compat` is that test alone.
compat-prepare: $(STAMP)
	$(BIN)/python -m tests.deploy.compat

compat: compat-prepare
	$(BIN)/python -m pytest -q tests/deploy/test_compat.py

# What CI runs: the same checks as `make check` (lint, format, types), then the whole suite.
test: backend repository compat-prepare
	$(BIN)/python -m ruff check .
	$(BIN)/python -m ruff format --check .
	$(BIN)/python -m mypy
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

# The gateway's own CPU cost per image against a network that costs almost nothing, beside
# the one-thread floor of its decode and preprocessing, and a py-spy profile of a worker
# under the 500x375 JPEG load (about 3 minutes).
bench-frontend: backend $(STAMP)
	$(BIN)/python -m bench.frontend --profile build/frontend.folded

# Goodput and latency past capacity, with and without admission control, and a 10-minute
# memory soak (about 16 minutes in all).
bench-overload: backend repository
	$(BIN)/python -m bench.overload --repository $(REPO)

# The nine hostile-client attacks of issue 19, each beside a well-behaved victim, before and
# after the protections, in a two-worker gateway in a 1 GiB cgroup (about 8 minutes).
bench-hostile: backend repository
	$(BIN)/python -m bench.hostile --repository $(REPO)

# What a lent GPU machine lacks to run the whole stack offline, in build/gpu-kit (at most
# 60 MiB; the builder fails if over): the trimmed tritonserver, the GPU PyTorch backend
# built here with nvcc 13 against the torch 2.11 wheel (downloaded once, about 530 MB),
# the gateway's wheels and photos. Run it there with
# `python -m bench.gpu.stack --kit build/gpu-kit --out DIR` (bench/README.md).
gpu-kit: $(STAMP)
	$(BIN)/python -m bench.gpu.kit --out build/gpu-kit

clean:
	rm -rf $(VENV) build $(REPO)/*/[0-9]* $(REPO)/*/labels.txt $(REPO)/*/configs .$(REPO).rollout
