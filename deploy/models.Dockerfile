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
# PyTorch's CPU build from PyTorch's own index (PyPI's wheel is a CUDA build of several GB),
# pinned by version; the only file not checked against a hash (README.md, "Reproducible
# images": that index could not be reached where the lock is made).
# hadolint ignore=DL3013
RUN pip install --no-deps --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
# Everything else the exporter imports, torch's own dependencies too, from the lock
# (deploy/requirements/models.txt, every file checked against its hash).
COPY deploy/requirements/models.txt /tmp/requirements.txt
RUN pip install --require-hashes --no-deps -r /tmp/requirements.txt \
    && python -c "import torch, numpy, safetensors, huggingface_hub"
COPY deploy/models-entrypoint.sh /usr/local/bin/models-entrypoint
RUN chmod 0755 /usr/local/bin/models-entrypoint \
    && groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --create-home --home-dir /home/app app \
    && mkdir -p /models /checkpoints /home/app/.cache/huggingface \
    && chown app:app /models /home/app/.cache /home/app/.cache/huggingface
WORKDIR /opt/app
# The code last, run from /opt/app (PYTHONPATH), not installed: a change of the code
# rebuilds only the layers from here.
COPY inception ./inception
ENV PYTHONPATH=/opt/app
# A named volume mounted on /models (or on the hub cache) starts with this folder's owner,
# so the job can write it.
VOLUME ["/models"]
USER 10001:10001
ENV HOME=/home/app \
    HF_HOME=/home/app/.cache/huggingface \
    MODELS_REPOSITORY=/models/repository \
    MODELS_CHECKPOINT_DIR=/checkpoints \
    MODELS_HUB=auto
ENTRYPOINT ["models-entrypoint"]
