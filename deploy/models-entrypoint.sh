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
#
# Each changed model is published as a new version folder, its whole model folder swapped
# in at once beside the repository's lock and staging area (inception/rollout.py), the
# version before it kept. With MODELS_TRITON_URL (compose sets http://triton:8000) the job
# then waits until that Triton serves every model as published; if it does not within
# MODELS_TRITON_WAIT_S (default 600), the job rolls those models back to the version Triton
# still serves and FAILS; where no Triton answers yet (the first `docker compose up`), it
# says so and succeeds.
#
# Other commands (`docker compose run --rm models <command>`):
#   rollback MODEL...   serve each model's previous version again (README.md, Runbook)
#   versions [MODEL...] list the versions each model keeps and what each holds
set -eu

repository="${MODELS_REPOSITORY:-/models/repository}"
checkpoints="${MODELS_CHECKPOINT_DIR:-/checkpoints}"
hub="${MODELS_HUB:-auto}"
allow_random="${MODELS_ALLOW_RANDOM:-none}"
python="${PYTHON:-python}"
triton_url="${MODELS_TRITON_URL:-}"
triton_wait="${MODELS_TRITON_WAIT_S:-600}"

log() { echo "[models] $*"; }

command="${1:-export}"
if [ "$#" -gt 0 ]; then
    shift
fi
case "$command" in
    export) ;;
    rollback)
        if [ "$#" -eq 0 ]; then
            log "rollback needs the models to roll back, e.g. rollback inception_v4"
            exit 2
        fi
        if [ -n "$triton_url" ]; then
            exec "$python" -m inception.rollback --repository "$repository" \
                --triton-url "$triton_url" --triton-timeout "$triton_wait" "$@"
        fi
        exec "$python" -m inception.rollback --repository "$repository" "$@"
        ;;
    versions)
        exec "$python" -m inception.rollback --repository "$repository" --list "$@"
        ;;
    *)
        log "unknown command '$command': export (the default), rollback MODEL..., versions [MODEL...]"
        exit 2
        ;;
esac

case "$hub" in
    auto | 1 | true | yes | always | 0 | false | no | never) ;;
    *)
        log "MODELS_HUB must be auto, 1 or 0, not '$hub'"
        exit 2
        ;;
esac

# Volumes written before the repository moved into a folder of its own (so that its lock
# and staging area sit beside it, outside Triton's view) hold the model folders at their
# root: they are copied over once, so that the weights they hold are kept (a pretrained
# export is never replaced by random ones) rather than exported again. Copies, not hard
# links: a new link changes a file's ctime, and the Triton still serving the old layout
# would reload every model.
parent="$(dirname "$repository")"
if [ ! -e "$repository" ] && [ -f "$parent/inception_v4/config.pbtxt" ]; then
    log "copying the model folders at $parent into $repository (remove the old ones once Triton serves it)"
    rm -rf "$repository.adopting"
    mkdir -p "$repository.adopting"
    for name in inception_v4 inception_resnet_v1 inception_resnet_v2 inception_ensemble_mean inception_ensemble; do
        if [ -d "$parent/$name" ]; then
            cp -a "$parent/$name" "$repository.adopting/$name"
        fi
    done
    mv "$repository.adopting" "$repository"
fi

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

if [ -n "$triton_url" ]; then
    set -- "$@" --triton-url "$triton_url" --triton-timeout "$triton_wait"
fi

log "exporting into $repository (hub: $hub; random weights allowed for: $allow_random)"
exec "$python" -m inception.export "$@"
