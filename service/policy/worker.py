"""The worker's resources and the one way to take them: :meth:`Policy.reserve` into a
request's :class:`Lease` (the package's docstring lists them), refused by the rule of
service/policy/refusals.py."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypedDict

from starlette.datastructures import Headers
from typing_extensions import Unpack

from .. import metrics
from ..admission import Admission, Ticket
from ..deadlines import remaining_s
from ..memory import MemoryAccount
from ..settings import Settings
from .clients import client_of
from .ledger import Ledger
from .refusals import refuse


class Amounts(TypedDict, total=False):
    """What a lease takes (:meth:`Policy.reserve`); each absent is none."""

    requests: int
    body_bytes: int
    images: int
    models: Sequence[str]
    decodes: int


class Lease:
    """What one request holds of the worker, given back once when it ends (``with`` or
    ``async with``, or :meth:`release`). ``ticket`` is its places in the models, to be
    completed once the answer is whole (service/admission.py)."""

    def __init__(self, policy: Policy, client: str) -> None:
        self.policy = policy
        self.client = client
        self.body_bytes = 0
        self.ticket: Ticket | None = None
        self._undo: list[Callable[[], None]] = []

    async def reserve(self, **amounts: Unpack[Amounts]) -> Lease:
        """Takes more into this lease (see :meth:`Policy.reserve`)."""
        policy = self.policy
        if requests := amounts.get("requests", 0):
            await policy.take_requests(self, requests)
        if body_bytes := amounts.get("body_bytes", 0):
            policy.take_bytes(self, body_bytes)
        if images := amounts.get("images", 0):
            policy.take_images(self, amounts.get("models", ()), images)
        if decodes := amounts.get("decodes", 0):
            policy.take_decodes(self, decodes)
        return self

    def on_release(self, undo: Callable[[], None]) -> None:
        self._undo.append(undo)

    def release(self) -> None:
        undo, self._undo = self._undo, []
        for step in reversed(undo):
            step()

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(self, *_: object) -> None:
        self.release()


class Policy:
    """One worker's policy: its resources, its ledger of clients, its admission control."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.slots = asyncio.Semaphore(settings.max_concurrency)
        self.memory = MemoryAccount(settings.memory_budget_bytes)
        self.body_bytes = 0  # what bodies and crops hold of the memory account
        self.decoding = 0  # images decoding or waiting for a decode thread
        self.ledger = Ledger(settings.error_rate_per_s, settings.error_burst, settings.error_pause_s)
        self.admission = Admission(
            settings.latency_target_s, settings.admission_initial_limit, settings.admission_min_limit
        )
        #: The models of a Triton ensemble, by name: its members do its work (``charged``).
        self.members: Callable[[str], Sequence[str]] = lambda _name: ()

    def client_of(self, headers: Headers, peer: str | None) -> str:
        """Who a request comes from (service/policy/clients.py)."""
        return client_of(headers, peer, bool(self.settings.api_keys))

    async def reserve(self, client: str, **amounts: Unpack[Amounts]) -> Lease:
        """A lease of what is asked, taken in this order, or the refusal's error raised with
        nothing kept: ``requests`` classify slots, ``body_bytes`` of memory within the
        bodies' budget, ``images`` places in each of ``models`` (and the members they
        charge), ``decodes`` places in the decode queue."""
        lease = Lease(self, client)
        try:
            return await lease.reserve(**amounts)
        except BaseException:
            lease.release()
            raise

    # --- the resources ---------------------------------------------------------------------

    async def take_requests(self, lease: Lease, count: int) -> None:
        """Classify slots, waited for at most ``queue_timeout_s``; a client already holding
        its cap is refused at once, so that uploads stalled or trickled by one client cannot
        hold them all. A free slot is taken at once: ``wait_for`` with a timeout of 0 would
        cancel the acquire before it ran, refusing every request when the timeout is 0."""
        client, ledger = lease.client, self.ledger
        cap = self.settings.max_concurrency_per_client
        for _ in range(count):
            if cap and ledger.held(client, "requests") >= cap:
                raise refuse("client", f"this client has {cap} requests in flight, its most; retry later")
            ledger.take(client, "requests", 1)
            try:
                if self.slots.locked():
                    try:
                        await asyncio.wait_for(self.slots.acquire(), timeout=self.settings.queue_timeout_s)
                    except TimeoutError:
                        raise refuse("worker", "too many requests in flight; retry later") from None
                else:
                    await self.slots.acquire()
            except BaseException:
                ledger.give(client, "requests", 1)
                raise
            lease.on_release(self._give_request(client))

    def _give_request(self, client: str) -> Callable[[], None]:
        def undo() -> None:
            self.slots.release()
            self.ledger.give(client, "requests", 1)

        return undo

    def take_bytes(self, lease: Lease, cost: int) -> None:
        """``cost`` bytes of the memory account for a body or crops, within the bodies'
        budget, or 429 at once. Within it one request alone is always admitted, whatever it
        costs, and what the same lease holds already counts as its own (a 144-crop request
        of a large photo alone fits whatever its total); a client holding none of the budget
        is let in past it too (the memory account still bounds it), so that slow uploads of
        one client, charged the largest body when chunked, cannot keep the others out. The
        event loop's single thread makes the check and the reservation one step."""
        client = lease.client
        budget = self.settings.buffer_budget_bytes
        newcomer = not self.ledger.held(client, "body_bytes")
        if self.body_bytes - lease.body_bytes and self.body_bytes + cost > budget and not newcomer:
            raise refuse("worker", "too many large requests in flight; retry later")
        self.memory.reserve_now(cost)
        self.body_bytes += cost
        lease.body_bytes += cost
        self.ledger.take(client, "body_bytes", cost)

        def undo() -> None:
            self.memory.release(cost)
            self.body_bytes -= cost
            lease.body_bytes -= cost
            self.ledger.give(client, "body_bytes", cost)

        lease.on_release(undo)

    def take_images(self, lease: Lease, models: Sequence[str], images: int) -> None:
        """A place for ``images`` in every model the request needs, or the refusal at once;
        the lease's ticket is to be completed once the answer is whole."""
        self.refuse_if_over_capacity(models, images, lease.client)
        charged = self.charged(models)
        ticket = lease.ticket = Ticket([self.admission.load(m) for m in charged], images, lease.client)

        def undo() -> None:
            ticket.leave()
            for model in charged:
                load = self.admission.load(model)
                metrics.ADMISSION_LIMIT.labels(model).set(load.limit)
                metrics.SERVICE_RATE.labels(model).set(load.rate or 0.0)

        lease.on_release(undo)

    def take_decodes(self, lease: Lease, count: int) -> None:
        """Places in the decode queue, or 429 past ``decode_queue``."""
        if self.decoding + count > self.settings.decode_queue:
            raise refuse("worker", "too many images are waiting to be decoded; retry later")
        self.decoding += count

        def undo() -> None:
            self.decoding -= count

        lease.on_release(undo)

    # --- admission ------------------------------------------------------------------------

    def charged(self, models: Sequence[str]) -> list[str]:
        """The models whose capacity a request uses: those it names and, for the Triton
        ensemble, each of its members, which do its work (a victim on ``inception_v4``
        must see the ensemble's load on it)."""
        names = list(dict.fromkeys(models))
        for name in list(names):
            names += [m for m in self.members(name) if m not in names]
        return names

    def crop_batch(self, models: Sequence[str], client: str) -> int:
        """Crops per Triton call of ``client``'s multi-crop request now: the setting's batch
        while the client is alone on its models, and while others send to them, what the
        slowest computes in a slice of the objective (``ModelLoad.in_slice``;
        service/batches.py says why)."""
        size = self.settings.crop_batch_size
        for model in self.charged(models):
            load = self.admission.loads.get(model)
            in_slice = load.in_slice() if load is not None else None
            if in_slice is not None and load is not None and load.active(client) > 1:
                size = min(size, in_slice)
        return size

    def refuse_if_over_capacity(self, models: Sequence[str], images: int, client: str = "") -> None:
        """Refused at once if these models cannot take the request now (service/admission.py):
        over the client's fair share beside other clients, or over a model's capacity."""
        if not self.settings.admission:
            return
        refusal = self.admission.refusal(self.charged(models), images, remaining_s(), client)
        if refusal is None:
            return
        metrics.SHED.labels(refusal.model, refusal.reason).inc()
        if refusal.reason == "share":
            raise refuse(
                "client",
                f"this client is over its fair share and could not be answered now ({refusal.detail}); "
                "retry later",
                refusal.retry_after_s,
                share=True,
            )
        if refusal.reason == "deadline":
            why = f"within its deadline ({refusal.detail})"
        else:
            why = f"within the latency objective of {self.settings.latency_target_s:g} s"
        raise refuse(
            "model",
            f"the server is at capacity and could not answer {why}; retry later",
            refusal.retry_after_s,
        )

    @contextmanager
    def decode_place(self, expected_s: float, left_s: float | None) -> Iterator[None]:
        """A place in the decode queue for one image, refused when its decode cannot end
        within the request's deadline at the decode time measured so far (503, the model's
        rule: the worker is over capacity for this deadline) or the queue is full (429)."""
        if left_s is not None and expected_s > left_s:
            raise refuse(
                "model",
                f"the image could not be decoded within the request's deadline ({left_s:.3g} s left, "
                f"about {expected_s:.3g} s of decoding queued); retry later",
                max(1, math.ceil(expected_s)),
            )
        lease = Lease(self, "")
        self.take_decodes(lease, 1)
        with lease:
            yield
