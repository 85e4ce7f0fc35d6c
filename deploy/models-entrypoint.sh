#!/bin/sh
# Entry point of the models image (compose `models` job, Kubernetes init container):
# exports the Triton repository (model files and configs/gpu.pbtxt, which Triton serves
# with --model-config-name=gpu) into $MODELS_REPOSITORY, choosing each
# network's weights and saying which:
#   1. $MODELS_CHECKPOINT_DIR/<model>.{safetensors,pth,pt,bin} when present;
#   2. else timm's published checkpoint from the hub when MODELS_HUB=1, or when
#      MODELS_HUB=auto (the default) and the hub answers;
#   3. else random initialisation (the export warns about it).
# A re-run with unchanged inputs skips the finished work, so this runs on every start.
set -eu

repository="${MODELS_REPOSITORY:-/models}"
checkpoints="${MODELS_CHECKPOINT_DIR:-/checkpoints}"
hub="${MODELS_HUB:-auto}"
endpoint="${HF_ENDPOINT:-https://huggingface.co}"
python="${PYTHON:-python}"

log() { echo "[models] $*"; }

set -- --repository "$repository"

for name in inception_v4 inception_resnet_v1 inception_resnet_v2; do
    found=""
    for ext in safetensors pth pt bin; do
        if [ -f "$checkpoints/$name.$ext" ]; then
            found="$checkpoints/$name.$ext"
            break
        fi
    done
    if [ -n "$found" ]; then
        log "$name: weights from the checkpoint $found"
        set -- "$@" --checkpoint "$name=$found"
    else
        log "$name: no checkpoint in $checkpoints"
    fi
done

case "$hub" in
    1 | true | yes) use_hub=1 ;;
    0 | false | no) use_hub=0 ;;
    auto)
        if "$python" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)" \
            "$endpoint" >/dev/null 2>&1; then
            use_hub=1
        else
            use_hub=0
        fi
        ;;
    *)
        log "MODELS_HUB must be auto, 1 or 0, not '$hub'"
        exit 2
        ;;
esac

if [ "$use_hub" = 1 ]; then
    log "the hub ($endpoint) is used for networks without a checkpoint that have a published one"
    set -- "$@" --hub
else
    log "no hub ($endpoint unreachable or MODELS_HUB=0): networks without a checkpoint get random initialisation"
fi

log "exporting into $repository"
exec "$python" -m inception.export "$@"
