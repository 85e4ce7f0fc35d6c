"""OpenTelemetry traces: one trace per request, from the caller's ``traceparent`` through
the gateway's stages into Triton (docs/architecture.md, "Observability").

Configured only by OpenTelemetry's standard variables, read by the SDK itself:
``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) turns tracing on,
``OTEL_EXPORTER_OTLP_PROTOCOL`` picks ``http/protobuf`` (the default, as the specification
says, and what Triton speaks) or ``grpc``, ``OTEL_SERVICE_NAME`` and
``OTEL_RESOURCE_ATTRIBUTES`` name the process, ``OTEL_TRACES_SAMPLER`` samples, ``OTEL_BSP_*``
size the export queue; ``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none`` turn it
off. With none of them set the gateway makes no span at all: the request path reads one
context variable and keeps a plain dict of stages, so tracing off costs nothing measurable.

Each worker process builds its own provider, in the app's lifespan (after uvicorn forks):
a provider's export thread does not survive a fork. The provider is never installed as
OpenTelemetry's global one, so that several apps in one process (the tests) do not share
one, and the request path finds it through :data:`active`, a context variable the
middleware sets for the request. Spans are exported by a batch processor in a thread of
its own, through a bounded queue: a slow or unreachable collector costs dropped spans,
never a request's latency or its answer.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from . import __version__

if TYPE_CHECKING:  # the SDK is imported only when tracing is on (Tracing.from_environment)
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger(__name__)

#: W3C Trace Context, the one propagation format both the browser side and Triton speak.
PROPAGATOR = TraceContextTextMapPropagator()
#: The headers a browser must be allowed to send for its trace to continue here (CORS).
TRACE_HEADERS = ("traceparent", "tracestate")
#: How long a stopping worker waits for its last spans to be exported.
SHUTDOWN_TIMEOUT_S = 2.0
#: The instrumentation scope of every span the gateway makes.
SCOPE = "service"

#: The stages the classify route times (``stages[name] = seconds``, set as each ends).
#: Decode and preprocess run one after the other in a thread and are set together once it
#: ends; the span of the first ends where the second's begins.
SEQUENTIAL = ("decode", "preprocess")


def _env(name: str) -> str:
    return os.environ.get(name, "").strip()


def enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the standard variables ask for an OTLP export: an endpoint set (or the
    ``otlp`` exporter named), the SDK not disabled, and the exporter not ``none``."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = {e.strip().lower() for e in env.get("OTEL_TRACES_EXPORTER", "").split(",") if e.strip()}
    if "none" in exporters:
        return False
    endpoint = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
        or env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    )
    return bool(endpoint) or "otlp" in exporters


def protocol(environ: Mapping[str, str] | None = None) -> str:
    """The OTLP protocol the variables name (the traces-specific one first); the
    specification's default is ``http/protobuf``."""
    env = os.environ if environ is None else environ
    chosen = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "").strip()
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "").strip()
    )
    return chosen.lower() or "http/protobuf"


def make_exporter(chosen: str) -> SpanExporter:
    """The OTLP exporter of the protocol; it reads its endpoint, headers, timeout and
    compression from the variables itself."""
    if chosen == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter()
    if chosen == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        return HttpExporter()
    raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={chosen!r} is not supported (http/protobuf or grpc)")


@dataclass
class Tracing:
    """One worker's provider and its tracer."""

    provider: TracerProvider
    tracer: Tracer

    @classmethod
    def from_environment(cls) -> Tracing | None:
        """The worker's tracing if the variables ask for it, else None. A protocol the
        gateway cannot speak is logged and leaves tracing off: traces are never worth a
        gateway that does not start, nor is a missing SDK (the GPU kit carries only the API):
        the SDK is imported here, once tracing is asked for."""
        if not enabled():
            return None
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            processor = BatchSpanProcessor(make_exporter(protocol()))
        except (ImportError, ValueError) as exc:
            log.error("tracing off", extra={"reason": str(exc)})
            return None
        # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; the default
        # name is the gateway's rather than the SDK's `unknown_service`, and the worker's pid
        # tells apart the spans of several workers behind one port.
        attributes: dict[str, Any] = {"service.version": __version__, "process.pid": os.getpid()}
        if not _env("OTEL_SERVICE_NAME") and "service.name=" not in _env("OTEL_RESOURCE_ATTRIBUTES"):
            attributes["service.name"] = "inception-gateway"
        provider = TracerProvider(resource=Resource.create(attributes), shutdown_on_exit=False)
        provider.add_span_processor(processor)
        return cls(provider, provider.get_tracer(SCOPE, __version__))

    def shutdown(self, timeout_s: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Export what is queued and stop the export thread (at the worker's end), for at
        most ``timeout_s``: against a collector that refuses connections the exporter's
        retries took 6.5 s, which a stopping worker must not wait. The rest is dropped."""

        def stop() -> None:
            try:
                self.provider.shutdown()
            except Exception:  # an exporter's failure must not fail the worker's shutdown
                log.exception("tracing shutdown failed")

        thread = threading.Thread(target=stop, name="tracing-shutdown", daemon=True)
        thread.start()
        thread.join(timeout_s)
        if thread.is_alive():
            log.warning("tracing shutdown timed out: queued spans dropped", extra={"timeout_s": timeout_s})


#: The tracing of the request being served (None while tracing is off): the middleware sets
#: it, and the Triton call reads it, without threading it through the route.
active: ContextVar[Tracing | None] = ContextVar("tracing", default=None)


class StageClock(dict[str, float]):
    """The route's ``stages``: a dict of durations in seconds that also notes, in wall-clock
    nanoseconds, when each was set. The route sets a stage as it ends, so its span runs from
    that time less its duration; the route itself needs to know nothing of tracing."""

    __slots__ = ("ended_ns",)

    def __init__(self) -> None:
        super().__init__()
        self.ended_ns: dict[str, int] = {}

    def __setitem__(self, key: str, value: float) -> None:
        self.ended_ns[key] = time.time_ns()
        super().__setitem__(key, value)

    def intervals(self) -> list[tuple[str, int, int]]:
        """``(stage, start_ns, end_ns)`` for every stage set, in the order they were set."""
        out: dict[str, tuple[int, int]] = {}
        for name, seconds in self.items():
            end = self.ended_ns[name]
            out[name] = (end - int(seconds * 1e9), end)
        first, second = SEQUENTIAL
        if first in out and second in out:
            # Both were set once the thread ended, the second stage last: the first ended
            # where the second began.
            end = out[second][0]
            out[first] = (end - int(self[first] * 1e9), end)
        return [(name, start, end) for name, (start, end) in out.items()]


@dataclass
class RequestTrace:
    """The server span of one request, and what makes its stage spans at the end."""

    tracing: Tracing
    span: Span
    token: object
    method: str

    @classmethod
    def start(cls, tracing: Tracing, method: str, path: str, headers: Mapping[str, str]) -> RequestTrace:
        """The request's span, the child of the caller's ``traceparent`` when it sends a valid
        one (an invalid one starts a new trace, as the specification says), made current."""
        parent = PROPAGATOR.extract(headers)
        span = tracing.tracer.start_span(
            f"{method} {path}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": path},
        )
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        return cls(tracing, span, token, method)

    def finish(
        self,
        status: int,
        stages: Mapping[str, float],
        attributes: Mapping[str, Any],
        route: str | None = None,
    ) -> None:
        """The stage spans, under the request's, then the request's own end, named by its
        route's template once routing found one (the method alone otherwise: a name per
        unknown path would make every typo a span name of its own)."""
        try:
            self.span.update_name(f"{self.method} {route}" if route else self.method)
            if route:
                self.span.set_attribute("http.route", route)
            parent = trace.set_span_in_context(self.span)
            if isinstance(stages, StageClock):
                for name, start, end in stages.intervals():
                    stage = self.tracing.tracer.start_span(name, context=parent, start_time=start)
                    stage.end(end_time=end)
            self.span.set_attribute("http.response.status_code", status)
            for key, value in attributes.items():
                if value is not None:
                    self.span.set_attribute(key, value)
            if status >= 500:  # a 4xx is the client's error, not the server span's
                self.span.set_status(Status(StatusCode.ERROR))
            self.span.end()
        finally:
            otel_context.detach(self.token)  # type: ignore[arg-type]


@contextmanager
def client_span(name: str, attributes: Mapping[str, Any]) -> Iterator[dict[str, str]]:
    """A client span under the current one, made current, yielding the headers that carry
    it to the server (``traceparent``); with tracing off, no span and no headers."""
    tracing = active.get()
    if tracing is None:
        yield {}
        return
    with tracing.tracer.start_as_current_span(name, kind=SpanKind.CLIENT, attributes=attributes) as span:
        headers: dict[str, str] = {}
        # Only a sampled context goes on: Triton traces every request that carries one,
        # whatever its sampled flag, and the trace it would join is not recorded.
        if span.get_span_context().trace_flags.sampled:
            PROPAGATOR.inject(headers)
        try:
            yield headers
        except BaseException as exc:
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise
