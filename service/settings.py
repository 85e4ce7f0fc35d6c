"""Gateway settings, read from the environment (prefix ``GATEWAY_``).

Everything an operator may want to change between a laptop, the embedded CPU stack and a
Kubernetes deployment lives here, so that no code has to be edited to move between them.
What they default to from the machine is read in :mod:`service.worker_share`.

Over 300 lines: one class of fields, each with the description the README's table is made of.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from inception import contract

from .options import MAX_IMAGES
from .worker_share import default_buffer_budget, default_memory_budget
from .worker_share import worker_count as worker_count  # service/gateway.py imports it from here


def default_models() -> list[str]:
    """The models that may be routed to: the contract's networks and their Triton ensemble,
    read when settings are (so a network added to the contract is routed with no edit
    here). ``inception_ensemble_mean`` is an internal step of the ensemble and is
    deliberately absent: it takes member probabilities, not images."""
    return [*contract.NETWORKS, contract.ENSEMBLE_NAME]


def _split_csv(value: object) -> object:
    """Accept ``a,b,c`` as well as a list: env vars are strings, and JSON lists in env vars
    are a trap for operators."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def default_labels_path() -> Path | None:
    """The labels file of the ``inception`` distribution, the one the exporter writes into
    the repository (one source of truth). It lies beside ``inception.contract``, which the
    gateway imports anyway; importing it costs no torch (``inception/__init__`` loads its
    torch-bound names lazily). None when an installation left the data out.
    """
    candidate = Path(contract.__file__).with_name("data") / "imagenet_labels.txt"
    return candidate if candidate.is_file() else None


class Settings(BaseSettings):
    """The gateway's configuration; see each field's description.

    Every field is declared one way, ``name: type = Field(default, bounds, description=...)``,
    because the descriptions are the README's settings table
    (``tests/gateway/settings/test_settings_documented.py``); ``NoDecode`` in a type marks a list read
    from a comma-separated string by a validator rather than as JSON.
    """

    # Errors never quote the input: a bad setting must not print the API keys beside it.
    model_config = SettingsConfigDict(
        env_prefix="GATEWAY_", extra="ignore", frozen=True, hide_input_in_errors=True
    )

    triton_grpc_url: str = Field("127.0.0.1:8001", description="host:port of Triton's gRPC endpoint")
    triton_timeout_s: float = Field(
        30.0, gt=0, description="deadline of one inference round trip; past it the answer is 504"
    )
    triton_probe_timeout_s: float = Field(
        2.0, gt=0, description="deadline of health and config calls to Triton"
    )
    triton_reconnect_backoff_ms: int = Field(
        1000, ge=100, description="cap of gRPC's reconnect backoff, so a restarted Triton is found fast"
    )
    triton_lb_policy: Literal["round_robin", "pick_first"] = Field(
        "round_robin",
        description="how requests spread over the addresses the Triton URL resolves to "
        "(round_robin: all of them, e.g. every pod behind a headless Service, `dns:///triton:8001`)",
    )
    triton_dns_min_interval_ms: int = Field(
        5000, ge=0, description="least time between two DNS resolutions of the Triton URL"
    )
    triton_keepalive_time_ms: int = Field(
        10_000,
        ge=5000,
        description="gRPC keepalive ping interval to Triton, so a frozen or vanished Triton node is dropped "
        "in seconds (Triton refuses pings more often than every 5 s)",
    )
    triton_keepalive_timeout_ms: int = Field(
        5000, ge=1000, description="a keepalive ping unanswered this long closes the connection"
    )
    triton_shared_memory: Literal["auto", "on", "off"] = Field(
        "auto",
        description="input tensors through system shared memory instead of gRPC payload (auto: when "
        "the Triton URL is a loopback address; a Triton that cannot map the regions turns them off)",
    )
    triton_shared_memory_mib: int = Field(
        64, ge=1, description="most shared memory one worker maps for Triton's inputs; past it, payload"
    )
    config_max_age_s: float = Field(
        10.0,
        ge=0,
        description="the model configs are read again this often, so new weights' provenance is "
        "learned without a restart (0: only at start and after a failure)",
    )
    triton_admin_key_file: str = Field(
        "",
        description="file holding the admin-key of Triton's restricted repository API, read at each "
        "check: the gateway reads the repository index with it to publish failed model loads "
        "(empty: the index is asked without a key, as an unrestricted Triton answers it)",
    )
    config_refresh_interval_s: float = Field(
        1.0, ge=0, description="at most one refresh of the model configs per interval while any is missing"
    )
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=default_models, description="routable Triton models (comma-separated)"
    )
    default_model: str = Field(
        default_factory=lambda: contract.NETWORKS[0],
        description="the model used when a request names none (default: the contract's first network)",
    )
    ensemble_model: str = Field(
        default_factory=lambda: contract.ENSEMBLE_NAME,
        description="the Triton ensemble that `model=ensemble` names",
    )
    labels_path: Path | None = Field(
        default_factory=default_labels_path, description="ImageNet labels, one per line, line i = class i"
    )

    max_body_bytes: int = Field(
        16 * 1024 * 1024,
        gt=0,
        description="largest image, or images of a batch together (raw bytes), accepted; bodies are refused "
        "while streaming",
    )
    buffer_budget_bytes: int = Field(
        default_factory=default_buffer_budget,
        gt=0,
        description="request bodies one worker buffers at once (as they will cost once read); "
        "past it a request is shed with 429 (default: a quarter of a worker's memory)",
    )
    memory_budget_bytes: int = Field(
        default_factory=default_memory_budget,
        gt=0,
        description="what one worker's requests may hold at once, all of it reserved before it is "
        "allocated (bodies, decoded pixels, crops, JSON parsing); past it a request waits "
        "`memory_wait_s` then gets 429 (default: 85 % of the worker's share of the cgroup's "
        "limit, less the worker's memory at start)",
    )
    memory_wait_s: float = Field(
        0.5, ge=0, description="how long a decode waits for memory to be given back before 429"
    )
    max_pixels: int = Field(
        50_000_000,
        gt=0,
        description="largest width*height decoded; larger images are refused before decoding",
    )
    draft: bool = Field(True, description="reduced-size JPEG decoding for images much larger than needed")
    draft_oversample: float = Field(
        2.0,
        ge=1.0,
        description="draft decoding keeps the shorter side at least this many times what the resize needs",
    )
    decode_threads: int = Field(
        2, ge=1, description="threads that decode and resize (Pillow releases the GIL)"
    )

    # Hostile clients (issue 19; README "Hostile clients", docs/architecture.md "Budgets").
    max_jpeg_scans: int = Field(32, ge=1, description="most scans a JPEG may have (encoders write 10)")
    decode_queue: int = Field(
        32,
        ge=1,
        description="images one worker decodes or holds waiting for a decode thread; past it, or "
        "when the wait would pass the request's deadline, a request is refused before decoding",
    )
    #: Per request (service/protocol.py): past a bound 431 or 408, and the connection closes.
    max_header_bytes: int = Field(32 * 1024, ge=1024, description="largest request line and headers")
    max_header_count: int = Field(100, ge=8, description="most header lines one request may send")
    header_timeout_s: float = Field(10.0, gt=0, description="deadline of a request's headers")
    #: Per worker: past a bound the new connection is answered 503 and closed unread.
    max_connections: int = Field(1024, ge=1, description="connections one worker holds at once")
    max_connections_per_peer: int = Field(
        256,
        ge=0,
        description="connections one worker holds at once from one peer address (0: no cap); behind "
        "a proxy every connection comes from the proxy, so set 0 or the proxy's pool size there",
    )
    crop_batch_size: int = Field(8, ge=1, description="most crops of one request in one Triton request")
    max_concurrency: int = Field(256, ge=1, description="classify requests handled at once by one worker")
    max_concurrency_per_client: int = Field(
        32, ge=0, description="of those, what one client (key, or address) may hold, uploads included"
    )
    body_timeout_s: float = Field(
        10.0,
        gt=0,
        description="deadline for a request's whole body once it holds a slot, plus its size at "
        "`min_body_rate_bytes_s`; past it the answer is 408",
    )
    min_body_rate_bytes_s: int = Field(128 * 1024, gt=0, description="slowest upload served (1 Mbit/s)")
    queue_timeout_s: float = Field(
        2.0, ge=0, description="how long a request waits for a free slot before 429"
    )
    retry_after_overloaded_s: int = Field(
        1,
        ge=0,
        description="Retry-After of 429 answers, but `over_share` "
        "(the time the work in flight takes to drain)",
    )
    error_rate_per_s: float = Field(
        2.0,
        ge=0,
        description="error answers of a client's own making (its 4xx: mistakes, and its excess "
        "over its share or its slots) a client may cause per second, after a burst of "
        "`error_burst`; past it each is held before it is sent (0: never held; a 503 never is)",
    )
    error_burst: int = Field(
        20, ge=1, description="error answers a client may cause at once before they are held"
    )
    error_pause_s: float = Field(
        5.0,
        ge=0,
        description="the most an error answer past the client's budget is held, and a connection "
        "refused for the connection limits before it is answered",
    )
    admission: bool = Field(
        True, description="admission control on (off: every request queues, as before it existed)"
    )
    latency_target_s: float = Field(
        0.5,
        gt=0,
        description="latency objective: admission control limits the images in flight per model so "
        "that answers come within it, and refuses the rest at once with 503 and Retry-After "
        "(service/admission.py)",
    )
    admission_initial_limit: int = Field(
        8, ge=1, description="images in flight per model before the first service-rate measurement"
    )
    admission_min_limit: int = Field(
        2, ge=1, description="images in flight per model always admitted, whatever the measured rate"
    )
    retry_after_unavailable_s: int = Field(
        5,
        ge=0,
        description="Retry-After of 503 answers, but those of admission control (the time the "
        "work in flight takes to drain) and of a failure to buffer an upload (1 s)",
    )

    #: Batches and the answer cache (issue 21; service/cache.py).
    max_images: int = Field(
        MAX_IMAGES,
        ge=1,
        le=MAX_IMAGES,
        description="most images one classify request may carry (repeated multipart `image` parts or a "
        "JSON `images` array); they go to Triton as one batch, so at most its max_batch_size (64)",
    )
    cache: bool = Field(
        True,
        description="answers cached by content (the image's bytes, the models, their coefficients, the "
        "crops and the served weights' sha256); off: every image is decoded and run",
    )
    cache_bytes: int = Field(
        32 * 1024 * 1024,
        ge=0,
        description="most bytes of cached answers one worker holds (about 4.3 KiB each), taken from its "
        "memory account; the least recently used go first",
    )

    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="when set, /v1 needs `Authorization: Bearer <key>` or `X-API-Key`"
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="origins allowed to call the API from a browser"
    )
    metrics_require_key: bool = Field(False, description="/metrics needs an API key too (when keys are set)")
    docs: bool = Field(True, description="serve /docs and /openapi.json (the API's shape, no data)")
    page: bool = Field(True, description="serve the page at / that tries the API from a browser")
    json_logs: bool = Field(True, description="structured JSON logs on stderr")
    log_level: str = Field("INFO", description="least level logged: DEBUG, INFO, WARNING or ERROR")

    @property
    def retry_after_s(self) -> dict[int, int]:
        """Retry-After by status, for the errors that carry no seconds of their own."""
        return {429: self.retry_after_overloaded_s, 503: self.retry_after_unavailable_s}

    @field_validator("models", "cors_origins", mode="before")
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, origins: list[str]) -> list[str]:
        """An origin is what a browser sends in ``Origin``: ``scheme://host[:port]``, no path.
        Browsers send it in lower case with no trailing slash, so ``https://App.example/``
        as written would never match and silently refuse the app: it is normalised, and
        anything with a path stops the start."""
        cleaned = [o.rstrip("/").lower() for o in origins]
        bad = [o for o in cleaned if o != "*" and not re.fullmatch(r"[a-z][a-z0-9+.-]*://[^/\s]+", o)]
        if bad:
            raise ValueError(f"GATEWAY_CORS_ORIGINS: not an origin (scheme://host[:port]): {', '.join(bad)}")
        return cleaned

    @field_validator("api_keys", mode="before")
    @classmethod
    def _keys(cls, value: object) -> object:
        """Empty means no keys; set to nothing but blanks and commas is a mistake that
        would silently turn authentication off, so it stops the start."""
        keys = _split_csv(value)
        if isinstance(value, str) and value != "" and not keys:
            raise ValueError("GATEWAY_API_KEYS is set but names no key")
        return keys

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if not self.models:
            raise ValueError("GATEWAY_MODELS names no model")
        if self.default_model not in self.models:
            raise ValueError(f"GATEWAY_DEFAULT_MODEL {self.default_model!r} is not in GATEWAY_MODELS")
        return self


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once."""
    return Settings()
