# syntax=docker/dockerfile:1
# The production model repository as an image, for the Kubernetes Triton pods
# (deploy/k8s/triton.yaml copies it into each pod in an init container). The export runs
# once, here, with the weights of this build; every pod then serves the same files and
# starts without downloading or tracing anything. The image is the cache of one export:
# tag it by its weights, and rebuild only when they (or the code) change.
#   docker buildx build -f deploy/repository.Dockerfile \
#       --build-context checkpoints=./checkpoints \
#       --build-arg MODELS_IMAGE=<registry>/inception-serving/models:0.1.0 \
#       -t <registry>/inception-serving/repository:<tag naming the weights> .
# The build fails, as the compose `models` job does, when a network would get random
# weights that MODELS_ALLOW_RANDOM does not allow (see deploy/models-entrypoint.sh).
ARG MODELS_IMAGE=inception-serving/models:0.1.0
ARG BUSYBOX_IMAGE=busybox:1.37.0

FROM ${MODELS_IMAGE} AS export
ARG MODELS_HUB=auto
ARG MODELS_ALLOW_RANDOM=none
# Not /models: the models image declares it a volume, and a build does not keep what a
# later step writes into a volume.
ENV MODELS_REPOSITORY=/home/app/repository \
    MODELS_CHECKPOINT_DIR=/checkpoints \
    MODELS_HUB=${MODELS_HUB} \
    MODELS_ALLOW_RANDOM=${MODELS_ALLOW_RANDOM}
RUN --mount=type=bind,from=checkpoints,target=/checkpoints models-entrypoint

FROM ${BUSYBOX_IMAGE}
COPY --from=export --chown=10001:10001 /home/app/repository /repository
USER 10001:10001
# Copies the repository, the export's stamps with it, into the pod's volume. Plain -R: the
# pod's user owns the copies, and nothing needs the image's owners or times.
ENTRYPOINT ["cp", "-R", "/repository/.", "/models/"]
