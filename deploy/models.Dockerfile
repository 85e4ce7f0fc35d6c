# syntax=docker/dockerfile:1
# The exporter image behind the compose `models` job and the build of the Kubernetes
# repository image (deploy/repository.Dockerfile): builds the networks (torch, CPU build:
# tracing needs no GPU and the traced graph holds no device-bound constants) with real
# weights (deploy/models-entrypoint.sh says which, and when it refuses), traces them and
# writes the production Triton repository.
#   docker build -f deploy/models.Dockerfile -t inception-serving/models:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.10-slim-bookworm
FROM ${PYTHON_IMAGE}
# Trace with the PyTorch that the pinned Triton image's libtorch backend is built from
# (24.10: PyTorch 2.5): TorchScript from a newer PyTorch may not load in an older
# libtorch. Move it together with the Triton tag in docker-compose.yml and deploy/k8s.
ARG TORCH_VERSION=2.5.1
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /opt/app
COPY pyproject.toml README.md ./
COPY inception ./inception
# The project itself, with its `models` extra (torch pinned there; installed above).
# hadolint ignore=DL3013
RUN pip install ".[models]"
COPY deploy/models-entrypoint.sh /usr/local/bin/models-entrypoint
RUN chmod 0755 /usr/local/bin/models-entrypoint \
    && groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --create-home --home-dir /home/app app \
    && mkdir -p /models /checkpoints /home/app/.cache/huggingface \
    && chown app:app /models /home/app/.cache /home/app/.cache/huggingface
# A named volume mounted on /models (or on the hub cache) starts with this folder's owner,
# so the job can write it.
VOLUME ["/models"]
USER 10001:10001
ENV HOME=/home/app \
    HF_HOME=/home/app/.cache/huggingface \
    MODELS_REPOSITORY=/models \
    MODELS_CHECKPOINT_DIR=/checkpoints \
    MODELS_HUB=auto
ENTRYPOINT ["models-entrypoint"]
