"""The gateway's side of Triton: one async gRPC channel, the models' configs, inference.

The repository is the source of truth for preprocessing and weight provenance, so configs
are read from Triton (``parameters``, parsed by :mod:`service.model_config`), at start when
Triton is up and lazily otherwise: the gateway starts, and becomes ready, whatever order the two come up in.
Triton's errors become the gateway's in :mod:`service.triton_errors`; the versions Triton
failed to load are read in :mod:`service.load_failures`, its service rates computed in
:mod:`service.service_rates`; inputs go through shared memory to a Triton on this host
(:mod:`service.input_regions`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException

from inception.contract import INPUT_NAME, OUTPUT_NAME

from . import metrics, tracing
from .deadlines import deadline_var, remaining_s
from .errors import BackendError, BackendTimeout, BackendUnavailable, ModelUnavailable
from .input_regions import InputRegions, is_lost_region, payload_tensors
from .load_failures import LoadFailures
from .model_config import ConfigError, ModelInfo, parse_model_config
from .periodic import Periodic
from .service_rates import ServiceRates
from .settings import Settings
from .triton_channel import channel_args
from .triton_errors import (
    checked_output,
    deadline_passed,
    map_triton_error,
    model_unavailable,
    server_unavailable,
    status_of,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Readiness:
    """What Triton says of itself and of each routable model."""

    server: bool
    models: dict[str, bool]

    @property
    def ready(self) -> bool:
        return self.server and all(self.models.values())


class TritonBackend:
    """One gRPC channel to Triton for the process, and the routable models' configs."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.models: dict[str, ModelInfo] = {}
        self.config_errors: dict[str, str] = {}
        self._client: grpcaio.InferenceServerClient | None = None
        self._refresh_lock = asyncio.Lock()
        self._last_refresh = float("-inf")
        self._stale = False
        self._watcher = Periodic(
            "config-watcher",
            settings.config_max_age_s,
            self._read_configs,
            log,
            "periodic config read failed",
        )
        self._rates = ServiceRates()
        self._loads = LoadFailures(settings)
        self.regions = InputRegions(
            settings.triton_shared_memory,
            settings.triton_grpc_url,
            settings.triton_shared_memory_mib << 20,
            settings.triton_probe_timeout_s,
        )

    @property
    def client(self) -> grpcaio.InferenceServerClient:
        if self._client is None:  # created lazily: grpc.aio channels belong to the running loop
            self._client = grpcaio.InferenceServerClient(
                self.settings.triton_grpc_url, channel_args=channel_args(self.settings)
            )
        return self._client

    async def start(self) -> None:
        """Read the configs if Triton is up; never fail (the gateway must start regardless).
        Then keep reading them every ``config_max_age_s``: Triton loads a new export without
        a restart (poll model control), and the provenance the gateway publishes must follow
        it even when no call fails."""
        await self.refresh(force=True)
        try:
            await self.check_loads()
        except Exception:  # the gateway starts regardless
            log.exception("model loads not checked")
        if self.settings.config_max_age_s > 0:
            self._watcher.start()

    async def _read_configs(self) -> None:
        if await self.live():  # a Triton that is down is found by the requests
            await self.refresh(force=True)
            await self.check_loads()

    async def check_loads(self) -> dict[str, str] | None:
        """Which models have a version Triton failed to load (see :mod:`service.load_failures`)."""
        return await self._loads.check(self.client)

    async def close(self) -> None:
        await self._watcher.stop()
        await self.regions.close(self._client)
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    async def refresh(self, names: Iterable[str] | None = None, *, force: bool = False) -> None:
        """Fetch the configs of ``names`` (default: every routable model), at most once per
        ``config_refresh_interval_s`` unless forced. Failures are logged, not raised."""
        wanted = list(names or self.settings.models)
        async with self._refresh_lock:
            now = time.monotonic()
            missing = [n for n in wanted if n not in self.models]
            if not force and not self._stale and not missing:
                return
            if not force and now - self._last_refresh < self.settings.config_refresh_interval_s:
                return
            self._last_refresh = now
            targets = list(self.settings.models) if self._stale or force else missing
            results = await asyncio.gather(*(self._fetch(n) for n in targets), return_exceptions=True)
            reached = False
            for name, result in zip(targets, results, strict=True):
                if isinstance(result, ModelInfo):
                    self.models[name] = result
                    self.config_errors.pop(name, None)
                    reached = True
                elif isinstance(result, ConfigError):
                    self.config_errors[name] = str(result)
                    self.models.pop(name, None)
                    reached = True
                    log.error(
                        "model config breaks the contract", extra={"model": name, "reason": str(result)}
                    )
                else:
                    log.warning("model config not read", extra={"model": name, "reason": str(result)})
            if reached:
                self._stale = False
            metrics.set_model_weights(self.models)

    async def _fetch(self, name: str) -> ModelInfo:
        config = await self.client.get_model_config(
            name, as_json=True, client_timeout=self.settings.triton_probe_timeout_s
        )
        info = parse_model_config(config)
        if info.name != name:
            raise ConfigError(f"asked for {name}, Triton answered {info.name}")
        return info

    async def model(self, name: str) -> ModelInfo:
        """The config of a routable model, read now if not yet known (502 while its config
        breaks the contract, 503 while it is unknown)."""
        if name not in self.models or self._stale:
            await self.refresh([name])
        info = self.models.get(name)
        if info is not None:
            return info
        if name in self.config_errors:
            raise BackendError(f"model {name} is misconfigured on the inference server")
        raise model_unavailable(name) if await self.live() else server_unavailable()

    async def infer(
        self, name: str, batch: np.ndarray | Mapping[str, np.ndarray], request_id: str = ""
    ) -> np.ndarray:
        """Probabilities ``[n, 1000]`` for a uint8 ``[n, H, W, 3]`` batch, sent as is, or
        for one such batch per named input (the ensemble whose members crop differently).

        What remains of the request's deadline (service/deadlines.py) goes with the call
        twice: as its gRPC deadline, and as Triton's request timeout, so that Triton drops
        the request from its queue instead of computing an answer nobody waits for.

        While tracing is on, the call is a client span under the request's, and its context
        goes to Triton as the gRPC ``traceparent`` header, so that Triton's own spans (its
        OpenTelemetry mode) join the request's trace."""
        remaining = remaining_s()
        budget = self.settings.triton_timeout_s if remaining is None else remaining
        if budget <= 0:
            raise deadline_passed()
        named = {INPUT_NAME: batch} if isinstance(batch, np.ndarray) else batch
        attributes = {
            "rpc.system": "grpc",
            "rpc.service": "inference.GRPCInferenceService",
            "rpc.method": "ModelInfer",
            "triton.model": name,
            "triton.batch_size": int(next(iter(named.values())).shape[0]),
        }
        tensors, lease = await self.regions.inputs(self.client, named)
        try:
            with tracing.client_span(f"triton ModelInfer {name}", attributes) as headers:

                async def call(tensors: list[grpcclient.InferInput]) -> grpcclient.InferResult:
                    return await self.client.infer(
                        name,
                        tensors,
                        outputs=[grpcclient.InferRequestedOutput(OUTPUT_NAME)],
                        request_id=request_id[:128],
                        timeout=max(1, int(budget * 1e6)),
                        client_timeout=budget,
                        headers=headers or None,
                    )

                try:
                    result = await call(tensors)
                except InferenceServerException as exc:
                    if lease is None or not is_lost_region(exc):
                        raise
                    self.regions.forget_registrations()  # Triton restarted: send as payload
                    metrics.TRITON_INPUTS.labels("grpc").inc()
                    result = await call(payload_tensors(named))
        except InferenceServerException as exc:
            error = map_triton_error(exc, name, self.settings)
            deadline = deadline_var.get()
            if isinstance(error, BackendTimeout) and deadline is not None and deadline.client:
                error = deadline_passed()
            if isinstance(error, BackendTimeout) and not await self.live():
                error = server_unavailable()
            if isinstance(error, BackendUnavailable | ModelUnavailable):
                self._stale = True  # Triton may come back with another repository
            log.warning(
                "triton call failed",
                extra={"model": name, "triton_status": status_of(exc), "triton_message": exc.message()},
            )
            raise error from None
        finally:
            if lease is not None:
                lease.release()
        try:
            probabilities = result.as_numpy(OUTPUT_NAME)
        except ValueError:  # e.g. an output of the wrong byte size
            probabilities = None
        return checked_output(probabilities, next(iter(named.values())).shape[0], name)

    async def service_rate(self, name: str) -> float | None:
        """Images ``name`` computed per second of compute, from Triton's statistics, recent or
        since Triton started (:class:`~service.service_rates.ServiceRates`); None where it has
        none (no inference yet, Triton unreachable). The same figure for every worker and
        replica: what a worker that has measured nothing of its own knows of the model's speed."""
        try:
            stats = await self.client.get_inference_statistics(
                name, as_json=True, client_timeout=self.settings.triton_probe_timeout_s
            )
        except InferenceServerException:
            return None
        return self._rates.update(name, stats)

    async def _probe(self, check: Callable[..., Awaitable[object]], *args: str) -> bool:
        """One of Triton's health checks, within the probe deadline; no answer is a no."""
        try:
            return bool(await check(*args, client_timeout=self.settings.triton_probe_timeout_s))
        except InferenceServerException:
            return False

    async def live(self) -> bool:
        """Triton answers: a model that is not ready is the model's fault, not Triton's."""
        return await self._probe(self.client.is_server_live)

    async def readiness(self) -> Readiness:
        """Triton's readiness and each routable model's, as ``/readyz`` and ``/v1/models``
        report them: a model is ready when Triton says so and its config has been read
        (a config that breaks the contract is never served)."""
        names = list(self.settings.models)
        server, *models = await asyncio.gather(
            self._probe(self.client.is_server_ready),
            *(self._probe(self.client.is_model_ready, n) for n in names),
        )
        if server or any(models):
            await self.refresh()  # a model ready in Triton whose config is not read yet
        return Readiness(
            server, {n: ready and n in self.models for n, ready in zip(names, models, strict=True)}
        )
