#!/bin/sh
# Entry point of the models image (the compose `models` job; the build of the Kubernetes
# repository image, deploy/repository.Dockerfile): exports the Triton repository (model
# files and configs/gpu.pbtxt, which Triton serves with --model-config-name=gpu) into
# $MODELS_REPOSITORY. Deployments serve real weights or nothing:
#   1. $MODELS_CHECKPOINT_DIR/<model>.{safetensors,pth,pt,bin} when present;
#   2. else timm's published checkpoint from the hub (MODELS_HUB: auto, the default, tries
#      it when the hub answers; 1 insists; 0 never);
#   3. else the export FAILS, naming the networks and what to do, unless the operator
#      allowed random weights for them explicitly: MODELS_ALLOW_RANDOM=inception_resnet_v1
#      (comma-separated names, or `all`). No checkpoint of Inception-ResNet-v1 is published.
# An existing pretrained export is never replaced by random weights (a hub that is down
# today keeps yesterday's weights; to start again from nothing, remove the volume), and a
# re-run with unchanged inputs skips the work.
set -eu

repository="${MODELS_REPOSITORY:-/models}"
checkpoints="${MODELS_CHECKPOINT_DIR:-/checkpoints}"
hub="${MODELS_HUB:-auto}"
allow_random="${MODELS_ALLOW_RANDOM:-none}"
python="${PYTHON:-python}"

log() { echo "[models] $*"; }

case "$hub" in
    auto | 1 | true | yes | always | 0 | false | no | never) ;;
    *)
        log "MODELS_HUB must be auto, 1 or 0, not '$hub'"
        exit 2
        ;;
esac

set -- --repository "$repository" --hub "$hub" --allow-random "$allow_random" --never-replace-pretrained

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

log "exporting into $repository (hub: $hub; random weights allowed for: $allow_random)"
exec "$python" -m inception.export "$@"
