#!/bin/sh
# Entry point of the gateway image: uvicorn with $WEB_CONCURRENCY workers. The workers share
# their Prometheus metrics through files in $PROMETHEUS_MULTIPROC_DIR, which must exist and
# be empty before the first worker imports prometheus_client: stale files from a previous
# run would add old counts to the new ones.
set -eu
: "${PROMETHEUS_MULTIPROC_DIR:=/tmp/gateway-metrics}"
export PROMETHEUS_MULTIPROC_DIR
rm -rf "$PROMETHEUS_MULTIPROC_DIR"
mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
# The HTTP protocol bounds headers (bytes, lines, time) and connections per worker
# (service/protocol.py), as embedded/gateway.py's command does for make serve and the tests;
# uvicorn's --limit-concurrency would answer in plain text, so it is not passed (the
# protocol's docstring says why).
# Clients are told apart by the X-Forwarded-For of the peers in FORWARDED_ALLOW_IPS (every
# peer by default: only the proxy reaches the pods; README, "identifying clients").
if [ "$#" -eq 0 ]; then
    set -- uvicorn service.app:app --host 0.0.0.0 --port "${PORT:-8080}" \
        --workers "${WEB_CONCURRENCY:-4}" --no-server-header \
        --proxy-headers --forwarded-allow-ips "${FORWARDED_ALLOW_IPS:-*}" \
        --http service.protocol:BoundedH11Protocol
fi
exec "$@"
