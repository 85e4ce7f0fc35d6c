"""Input tensors through Triton's system shared memory, for a Triton on the same host.

Sent as gRPC payload, a 299x299 image is copied three times on the gateway's side (into
the ``InferInput``, into the serialised protobuf, through the socket) and parsed again by
Triton. Written once into a shared memory region that Triton has mapped, only the region's
name, offset and size travel: Triton reads the pixels where they are. This is the same-host
case only: a remote Triton cannot map this host's memory, so ``auto`` (the default) uses
regions only when the gRPC address is a loopback one, and any region Triton cannot open
turns them off for the worker, requests going on as payload (docs/architecture.md,
"Input tensors through shared memory").

Each worker owns a pool of regions (``/dev/shm`` objects), sized in powers of two from
512 KiB, registered with Triton when first made and reused by one request at a time. A
request that finds no free region within the worker's budget goes as payload. Names carry
the worker's pid and a token of its start, so workers and restarts never collide.

Clean up, in the three ways a worker ends: a clean stop unregisters and unlinks its
regions; a killed worker's objects and Triton's registrations of them are dropped by the next
worker's first registration (:meth:`InputRegions.sweep`), and by Python's resource tracker
when the whole gateway stops; a Triton that restarts forgets every registration, which the
first request to find its region unknown learns (NOT_FOUND), so the pool registers again and
that request is sent again as payload.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path
from typing import Literal

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException

from . import metrics
from .process_tree import has_ended

log = logging.getLogger(__name__)

#: What every region's name and key starts with: how a worker's sweep knows the gateway's.
PREFIX = "inception-gw-"
SMALLEST_REGION = 512 * 1024
SHM_DIR = Path("/dev/shm")

Mode = Literal["auto", "on", "off"]


def is_loopback(grpc_url: str) -> bool:
    """Whether a ``host:port`` (or ``dns:///host:port``) names this host's loopback."""
    target = grpc_url.split("///", 1)[-1]
    if target.startswith("["):
        host = target[1:].split("]", 1)[0]
    elif target.count(":") == 1:
        host = target.split(":", 1)[0]
    else:
        host = target
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def owner_gone(name: str) -> bool:
    """Whether the worker whose pid a region's name carries has ended."""
    try:
        pid = int(name[len(PREFIX) :].split("-", 1)[0])
    except ValueError:
        return False  # not a name of ours
    return has_ended(pid)


def region_bytes(needed: int) -> int:
    """The size class of a request's inputs: the least power of two at least 512 KiB."""
    size = SMALLEST_REGION
    while size < needed:
        size *= 2
    return size


def is_lost_region(exc: InferenceServerException) -> bool:
    """Triton no longer knows a region it was given (it restarted, or it was unregistered)."""
    return "shared memory region" in (exc.message() or "").lower()


@dataclass(eq=False)
class Region:
    name: str
    memory: shared_memory.SharedMemory
    size: int
    registered: bool = False

    @property
    def key(self) -> str:
        return "/" + self.memory.name


@dataclass(eq=False)
class Lease:
    """A region held by one request, its inputs written in, until :meth:`release`."""

    pool: InputRegions
    region: Region

    def release(self) -> None:
        self.pool.give_back(self.region)


def payload_tensors(named: Mapping[str, np.ndarray]) -> list[grpcclient.InferInput]:
    """The inputs as gRPC payload: how they go to a remote Triton, or when no region serves."""
    tensors = []
    for name, array in named.items():
        tensor = grpcclient.InferInput(name, list(array.shape), "UINT8")
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


class InputRegions:
    """One worker's pool of registered regions, and whether it may use them at all."""

    def __init__(self, mode: Mode, grpc_url: str, budget_bytes: int, timeout_s: float = 2.0) -> None:
        self.timeout_s = timeout_s
        self.enabled = mode == "on" or (mode == "auto" and is_loopback(grpc_url) and SHM_DIR.is_dir())
        self.budget_bytes = budget_bytes
        self._token = f"{PREFIX}{os.getpid()}-{secrets.token_hex(4)}-"
        self._regions: list[Region] = []
        self._free: dict[int, list[Region]] = {}
        self._swept = False

    @property
    def mapped_bytes(self) -> int:
        return sum(region.size for region in self._regions)

    async def inputs(
        self, client: grpcaio.InferenceServerClient, named: Mapping[str, np.ndarray]
    ) -> tuple[list[grpcclient.InferInput], Lease | None]:
        """The request's input tensors: written into a region when one serves, else payload."""
        lease = await self._lease(client, sum(a.nbytes for a in named.values())) if self.enabled else None
        if lease is None:
            metrics.TRITON_INPUTS.labels("grpc").inc()
            return payload_tensors(named), None
        tensors, offset = [], 0
        buffer = lease.region.memory.buf
        for name, array in named.items():
            np.ndarray(array.shape, np.uint8, buffer=buffer, offset=offset)[...] = array
            tensor = grpcclient.InferInput(name, list(array.shape), "UINT8")
            tensor.set_shared_memory(lease.region.name, array.nbytes, offset)
            tensors.append(tensor)
            offset += array.nbytes
        metrics.TRITON_INPUTS.labels("shared_memory").inc()
        return tensors, lease

    async def _lease(self, client: grpcaio.InferenceServerClient, needed: int) -> Lease | None:
        size = region_bytes(needed)
        free = self._free.get(size)
        region = free.pop() if free else None
        if region is None:
            if self.mapped_bytes + size > self.budget_bytes:
                return None
            try:
                region = self._create(size)
            except OSError as exc:
                log.warning("shared memory region not made; inputs go as payload", extra={"reason": str(exc)})
                return None
        if not region.registered and not await self._register(client, region):
            self.give_back(region)
            return None
        return Lease(self, region)

    def _create(self, size: int) -> Region:
        name = f"{self._token}{len(self._regions)}"
        region = Region(name, shared_memory.SharedMemory(name=name, create=True, size=size), size)
        self._regions.append(region)
        metrics.SHARED_MEMORY_BYTES.inc(size)
        return region

    async def _register(self, client: grpcaio.InferenceServerClient, region: Region) -> bool:
        if not self._swept:
            self._swept = True
            await self.sweep(client)
        try:
            await client.register_system_shared_memory(
                region.name, region.key, region.size, client_timeout=self.timeout_s
            )
        except InferenceServerException as exc:
            if "unable to open" in (exc.message() or "").lower():
                # Triton cannot see this host's /dev/shm (another container, another host
                # behind a loopback port): regions can never serve this worker.
                self.enabled = False
                log.warning(
                    "Triton cannot map this host's shared memory; inputs go as gRPC payload",
                    extra={"reason": exc.message()},
                )
            return False  # Triton down or busy: this request goes as payload
        region.registered = True
        return True

    def give_back(self, region: Region) -> None:
        if region in self._regions:  # not one the pool dropped while it was leased (close)
            self._free.setdefault(region.size, []).append(region)

    def forget_registrations(self) -> None:
        """Triton lost our regions (it restarted): each is registered again at its next use."""
        for region in self._regions:
            region.registered = False

    async def sweep(self, client: grpcaio.InferenceServerClient) -> list[str]:
        """Drop what killed workers left: their objects in ``/dev/shm`` (unlinked, and struck
        from the resource tracker the workers share with uvicorn's supervisor, which would
        otherwise unlink them only when the whole gateway stops) and Triton's registrations
        of them (Triton maps them, and so holds their memory, until they are unregistered).
        A worker is dead when its pid is: the workers that share a ``/dev/shm`` share a pid
        namespace (one container, one host), which is what ``auto`` assumes."""
        for path in SHM_DIR.glob(PREFIX + "*"):
            if owner_gone(path.name):
                with contextlib.suppress(OSError):
                    path.unlink()
                    resource_tracker.unregister("/" + path.name, "shared_memory")
        try:
            status = await client.get_system_shared_memory_status(as_json=True, client_timeout=self.timeout_s)
        except InferenceServerException:
            return []
        regions = status.get("regions", {}) if isinstance(status, dict) else {}
        stale = [
            name
            for name, region in regions.items()
            if name.startswith(PREFIX)
            and (owner_gone(name) or not (SHM_DIR / str(region.get("key", "")).lstrip("/")).exists())
        ]
        for name in stale:
            with contextlib.suppress(InferenceServerException):
                await client.unregister_system_shared_memory(name, client_timeout=self.timeout_s)
        if stale:
            log.info("unregistered regions of workers gone", extra={"regions": len(stale)})
        return stale

    async def close(self, client: grpcaio.InferenceServerClient | None) -> None:
        """Unregister and unlink every region (the worker stops)."""
        regions, self._regions, self._free = self._regions, [], {}
        for region in regions:
            if client is not None and region.registered:
                # A Triton that is down took the registration with it.
                with contextlib.suppress(InferenceServerException):
                    await client.unregister_system_shared_memory(region.name, client_timeout=self.timeout_s)
            region.memory.close()
            with contextlib.suppress(FileNotFoundError):
                region.memory.unlink()
            metrics.SHARED_MEMORY_BYTES.dec(region.size)
