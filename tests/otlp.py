"""A small OTLP/HTTP receiver for the tests: the real protocol (``POST /v1/traces``, an
``ExportTraceServiceRequest`` in protobuf, answered with an ``ExportTraceServiceResponse``),
decoded with ``opentelemetry-proto``'s own classes, so that what the gateway and Triton export
is checked as a collector would read it."""

from __future__ import annotations

import base64
import gzip
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as received, with its resource's service name."""

    service: str
    resource: dict[str, Any]
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]


class Receiver:
    """Collects the spans posted to ``http://127.0.0.1:<port>/v1/traces``."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        #: The encodings received: Triton 2.51 posts OTLP/HTTP JSON, the gateway protobuf.
        self.encodings: set[str] = set()
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                media = self.headers.get("Content-Type", "").split(";")[0].strip()
                if self.path != "/v1/traces":
                    self.send_error(404)
                    return
                if media == "application/x-protobuf":
                    receiver.add(ExportTraceServiceRequest.FromString(body), "protobuf")
                    answer = ExportTraceServiceResponse().SerializeToString()
                elif media == "application/json":
                    receiver.add(from_otlp_json(body), "json")
                    answer, media = b"{}", "application/json"
                else:
                    self.send_error(415)
                    return
                self.send_response(200)
                self.send_header("Content-Type", media)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def add(self, request: ExportTraceServiceRequest, encoding: str) -> None:
        received = []
        for resource_spans in request.resource_spans:
            attributes = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            service = str(attributes.get("service.name", ""))
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(
                        ReceivedSpan(
                            service=service,
                            resource=attributes,
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            kind=span.kind,
                            start_ns=span.start_time_unix_nano,
                            end_ns=span.end_time_unix_nano,
                            attributes={a.key: _value(a.value) for a in span.attributes},
                        )
                    )
        with self._lock:
            self.encodings.add(encoding)
            self.spans.extend(received)

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def wait_for(
        self, condition: Callable[[list[ReceivedSpan]], bool], trace_id: str, timeout: float = 30.0
    ) -> list[ReceivedSpan]:
        """The trace's spans once ``condition`` holds of them (exports are batched)."""
        deadline = time.monotonic() + timeout
        while True:
            spans = self.trace(trace_id)
            if condition(spans) or time.monotonic() > deadline:
                return spans
            time.sleep(0.1)


#: The fields that OTLP/HTTP JSON writes in hex where protobuf's JSON mapping expects base64.
_HEX_IDS = ("traceId", "spanId", "parentSpanId")


def _ids_to_base64(node: Any) -> Any:
    if isinstance(node, dict):
        return {
            k: base64.b64encode(bytes.fromhex(v)).decode() if k in _HEX_IDS and v else _ids_to_base64(v)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_ids_to_base64(v) for v in node]
    return node


def from_otlp_json(body: bytes) -> ExportTraceServiceRequest:
    """An OTLP/HTTP JSON export as the protobuf message (OTLP's JSON is protobuf's mapping
    but for the ids, which are hex)."""
    return json_format.ParseDict(_ids_to_base64(json.loads(body)), ExportTraceServiceRequest())


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


@contextmanager
def receiving() -> Iterator[Receiver]:
    receiver = Receiver()
    thread = threading.Thread(target=receiver.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()
