"""Which models have a version Triton failed to load, read from its repository index and
published as ``inception_gateway_model_load_failed``: a bad export in poll mode leaves the old
version ready and is retried at every poll, so neither readiness nor the configs show it,
and nothing else tells an operator before the next restart, which would fail on it.

Apart from the client (:mod:`service.triton`, which calls :meth:`LoadFailures.check` beside
each config read) because it is Triton's vocabulary of states and reasons, and its restricted
repository API with the admin key, none of which the rest of the client needs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException

from . import metrics
from .settings import Settings

log = logging.getLogger(__name__)

#: How Triton's repository index words a version whose folder has gone since it was listed
#: (2.51): no load is failing then, the version is simply no longer there.
GONE_FROM_DISK = "Unavailable: unable to find"


def _version(entry: Mapping[str, str]) -> int:
    try:
        return int(entry.get("version", ""))
    except ValueError:
        return -1


def failed_loads(entries: Iterable[Mapping[str, str]]) -> dict[str, str]:
    """Model -> the first line of Triton's reason, for each model with a version UNAVAILABLE
    for a reason and newer than its newest ready version. A version unloaded on purpose (an
    older one, under ``version_policy`` latest 1) says ``unloaded`` and is no failure, nor is
    one whose folder has gone since."""
    entries = list(entries)
    newest_ready: dict[str, int] = {}
    for entry in entries:
        if entry.get("state") == "READY":
            name, version = entry.get("name", ""), _version(entry)
            newest_ready[name] = max(newest_ready.get(name, -1), version)
    failed: dict[str, str] = {}
    for entry in entries:
        name, reason = entry.get("name", ""), entry.get("reason", "")
        if (
            entry.get("state") == "UNAVAILABLE"
            and reason
            and reason != "unloaded"  # put away on purpose (version_policy)
            and not reason.startswith(GONE_FROM_DISK)  # removed since: nothing to load
            and _version(entry) > newest_ready.get(name, -1)  # not superseded by a newer one
        ):
            failed.setdefault(name, reason.splitlines()[0])
    return failed


class LoadFailures:
    """The check, and whether the index was refused at the previous one (logged once per run
    of refusals)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._index_refused = False

    def _admin_headers(self) -> dict[str, str] | None:
        path = self.settings.triton_admin_key_file
        if not path:
            return None
        try:
            key = Path(path).read_text().strip()
        except OSError as exc:
            log.warning("Triton's admin key not read", extra={"path": path, "reason": str(exc)})
            return None
        # Triton's gRPC endpoint expects a restricted protocol's header under this prefix.
        return {"triton-grpc-protocol-admin-key": key} if key else None

    async def check(self, client: grpcaio.InferenceServerClient) -> dict[str, str] | None:
        """Model -> Triton's reason for each failed load (:func:`failed_loads`), published.
        None when the index cannot be read (Triton down, or its repository API restricted
        and no key given: logged, the gauge left as it was)."""
        try:
            index = await client.get_model_repository_index(
                headers=self._admin_headers(),
                as_json=True,
                client_timeout=self.settings.triton_probe_timeout_s,
            )
        except InferenceServerException as exc:
            # Once per run of failures: a Triton that restricts its repository API (Kubernetes,
            # where weights roll out as pods, not by polling) refuses it at every check.
            if not self._index_refused:
                log.warning("Triton's repository index not read", extra={"reason": str(exc)})
            self._index_refused = True
            return None
        self._index_refused = False
        entries = index.get("models", [])
        names = set(self.settings.models) | {e.get("name", "") for e in entries}
        failed = failed_loads(entries)
        for name in sorted(names):
            metrics.MODEL_LOAD_FAILED.labels(name).set(1 if name in failed else 0)
        for name, reason in failed.items():
            log.error("a version of the model failed to load", extra={"model": name, "reason": reason})
        return failed
