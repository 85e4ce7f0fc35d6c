"""The FastAPI app: ``uvicorn service.app:app`` or ``create_app(settings)``.

The factory wires the parts (`middleware`, `gateway` state, `routes`); nothing here
touches Triton, which the lifespan reaches and tolerates the absence of.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from . import __version__
from .deadlines import HEADER
from .errors import install_error_handlers
from .gateway import Gateway
from .imaging import configure_pillow
from .logs import configure_logging
from .memory import configure_allocator
from .middleware import RequestContextMiddleware
from .policy import hold_error
from .routes import classify, health, models, page
from .settings import Settings, get_settings
from .tracing import TRACE_HEADERS, Tracing


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings.log_level, settings.json_logs)
    configure_pillow(settings.max_pixels)
    configure_allocator()
    gateway = Gateway(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Here, not in the factory: each uvicorn worker runs its own lifespan after the fork,
        # and a provider's export thread does not survive one (service/tracing.py).
        app.state.tracing = Tracing.from_environment()
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()
            tracing, app.state.tracing = app.state.tracing, None
            if tracing is not None:
                await asyncio.to_thread(tracing.shutdown)  # bounded, off the event loop

    app = FastAPI(
        title="Inception gateway",
        version=__version__,
        description="Image classification with Inception-v4, Inception-ResNet-v1/v2 and their ensemble, "
        "served by Triton.",
        lifespan=lifespan,
        docs_url="/docs" if settings.docs else None,
        redoc_url="/redoc" if settings.docs else None,
        openapi_url="/openapi.json" if settings.docs else None,
    )
    app.state.gateway = gateway
    app.state.tracing = None  # the lifespan's, once started
    install_error_handlers(app, settings.retry_after_s, hold_error)
    app.include_router(classify.router)
    app.include_router(models.router)
    app.include_router(health.router)
    if settings.page:
        app.include_router(page.router)
    app.add_middleware(RequestContextMiddleware)
    if settings.cors_origins:
        # Outermost, so that every answer a listed origin gets is readable there, the last
        # guard's 500 included; a preflight is answered here and reaches no route. Other
        # origins get no CORS header at all, so the browser refuses them the answer.
        # An origin with `*` in its host (`https://*.example.com`) is a pattern: one DNS label
        # or more in place of the star, as a regex, since Starlette matches the list exactly.
        exact = [o for o in settings.cors_origins if o == "*" or "*" not in o]
        patterns = [origin_pattern(o) for o in settings.cors_origins if o != "*" and "*" in o]
        app.add_middleware(
            CORSMiddleware,
            allow_origins=exact,
            allow_origin_regex="|".join(patterns) or None,
            allow_methods=["GET", "POST"],
            # traceparent and tracestate: a browser's trace continues through the gateway;
            # Cache-Control: a web app may ask for no cached answer (`no-store`, `no-cache`).
            allow_headers=[
                "Authorization",
                "X-API-Key",
                "Content-Type",
                "Cache-Control",
                "X-Request-ID",
                HEADER,
                *TRACE_HEADERS,
            ],
            # X-Cache: a web app on another origin can tell a cached answer from a new one.
            expose_headers=["X-Request-ID", "Retry-After", classify.CACHE_HEADER],
            max_age=600,
        )
    return app


#: What a `*` in an allowed origin stands for: one DNS label or more.
_LABELS = r"[a-z0-9-]+(?:\.[a-z0-9-]+)*"


def origin_pattern(origin: str) -> str:
    """``https://*.example.com`` as a regex matching ``https://app.example.com`` and
    ``https://a.b.example.com``, not ``https://example.com`` nor ``https://evil.com/.example.com``
    (Starlette matches ``allow_origin_regex`` whole)."""
    return "(?:" + _LABELS.join(re.escape(part) for part in origin.split("*")) + ")"


def __getattr__(name: str) -> Any:
    """``service.app:app`` built on first access, so importing the module has no side effects."""
    if name == "app":
        application = create_app()
        globals()["app"] = application
        return application
    raise AttributeError(name)
