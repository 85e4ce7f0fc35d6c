# syntax=docker/dockerfile:1
# The gateway image: FastAPI on uvicorn, no torch. Built from the repository root:
#   docker build -f deploy/gateway.Dockerfile -t inception-serving/gateway:0.1.0 .
# (deploy/gateway.Dockerfile.dockerignore keeps the context to what the build reads.)
ARG PYTHON_IMAGE=python:3.11.10-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
# The dependencies alone, from the lock (deploy/requirements/gateway.txt: the gateway extra
# resolved for this Python, every file checked against its hash; README.md, "Reproducible
# images"), in a layer that a change of the code does not rebuild (and no torch).
COPY deploy/requirements/gateway.txt /tmp/requirements.txt
RUN /opt/venv/bin/pip install --no-compile --require-hashes --no-deps -r /tmp/requirements.txt \
    && ! /opt/venv/bin/python -c "import torch" 2>/dev/null

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /nonexistent --shell /usr/sbin/nologin app
COPY --from=build /opt/venv /opt/venv
COPY --chmod=0755 deploy/gateway-entrypoint.sh /usr/local/bin/gateway-entrypoint
# The code last: the gateway and the contract it shares with the exporter (names, dims,
# parameter keys; imports no torch), run from /opt/app (PYTHONPATH), not installed.
COPY service /opt/app/service
COPY inception/__init__.py inception/contract.py /opt/app/inception/
# The labels file the exporter writes into labels.txt too; one source of truth.
COPY inception/data/imagenet_labels.txt /opt/app/imagenet_labels.txt
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/opt/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GATEWAY_LABELS_PATH=/opt/app/imagenet_labels.txt \
    PROMETHEUS_MULTIPROC_DIR=/tmp/gateway-metrics \
    WEB_CONCURRENCY=4
WORKDIR /opt/app
USER 10001:10001
EXPOSE 8080
# The process serves (/healthz), whether or not Triton does (/readyz would restart a
# gateway that answers 503 while Triton is away).
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
# uvicorn with WEB_CONCURRENCY workers; their metrics are aggregated through PROMETHEUS_MULTIPROC_DIR.
ENTRYPOINT ["gateway-entrypoint"]
