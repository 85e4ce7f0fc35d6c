"""Fixtures of the browser tests: Debian's chromium driven by Playwright, real gateway
processes against the shared real Triton, and tiny second origins for the web-app tests.

Playwright's own browser download cannot work on these machines, so it drives the
chromium that `make` installs from Debian (`executable_path`). Running as root in a
container, chromium needs `--no-sandbox`; the other flags keep it from reaching for
Google's services, whose connections this machine's closed network refuses. The browser,
the gateways and the second origins live as long as this folder's tests, not the session.
"""

from __future__ import annotations

import functools
import select
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from ..gateway.helpers import MODEL, GatewayProcess, classify, running_gateway
from ..helpers import TritonEndpoint
from .helpers import API_KEY, MAX_BODY_BYTES, Origin

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


#: Where the screenshots go (git-ignored); docs/page.png is a committed copy of one.
@pytest.fixture(scope="package")
def browser() -> Iterator[Browser]:
    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail("chromium is not installed: `make test` installs Debian's chromium")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh context (cookies, sessionStorage) for each test, sized like a laptop."""
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    context.set_default_timeout(60_000)  # a classify is seconds on 2 shared cores
    try:
        yield context.new_page()
    finally:
        context.close()


def _serve_origin(folder: Path) -> Iterator[Origin]:
    """`http.server` on a free 127.0.0.1 port: another origin than the gateway's."""

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Origin(f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="package")
def app_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("webapp")
    (folder / "app.html").write_text("<!doctype html><title>a web app</title><p>a web app</p>")
    return folder


@pytest.fixture(scope="package")
def listed_origin(app_folder: Path) -> Iterator[Origin]:
    yield from _serve_origin(app_folder)


@pytest.fixture(scope="package")
def other_origin(app_folder: Path) -> Iterator[Origin]:
    yield from _serve_origin(app_folder)


@pytest.fixture(scope="package")
def page_gateway(
    gateway_triton: TritonEndpoint,
    listed_origin: Origin,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[GatewayProcess]:
    """The page's gateway: one web app's origin listed, a small body limit, and one slot
    with no queue, so that a held slot makes the next request a 429."""
    env = {
        "GATEWAY_CORS_ORIGINS": listed_origin.url,
        "GATEWAY_MAX_BODY_BYTES": str(MAX_BODY_BYTES),
        "GATEWAY_MAX_CONCURRENCY": "1",
        "GATEWAY_QUEUE_TIMEOUT_S": "0",
        "GATEWAY_BODY_TIMEOUT_S": "120",
    }
    log = tmp_path_factory.mktemp("page-gateway") / "gateway.log"
    with running_gateway(gateway_triton.grpc_url, log, env=env) as process:
        yield process


@pytest.fixture(scope="package")
def keyed_gateway(
    gateway_triton: TritonEndpoint,
    listed_origin: Origin,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[GatewayProcess]:
    """A gateway with API keys, the same web app's origin listed."""
    env = {"GATEWAY_CORS_ORIGINS": listed_origin.url, "GATEWAY_API_KEYS": API_KEY}
    log = tmp_path_factory.mktemp("keyed-gateway") / "gateway.log"
    with running_gateway(gateway_triton.grpc_url, log, env=env) as process:
        yield process


@pytest.fixture
def held_slot(page_gateway: GatewayProcess) -> Iterator[None]:
    """The page gateway's only slot, held by a request whose body never comes."""
    with page_gateway.client() as client:
        stalled = _stall(page_gateway.port, client)
        try:
            yield
        finally:
            stalled.close()
        _wait_for(lambda: _probe(client) != 429, "the held slot never came back")


def _stall(port: int, client: httpx.Client, timeout: float = 30.0) -> socket.socket:
    """A connection whose request holds the slot: proven by a probe's 429. A probe that
    slips in first gets the slot and the stalled request a 429 of its own; then again."""
    head = (
        f"POST /v1/classify?model={MODEL} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Content-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
    ).encode()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stalled = socket.create_connection(("127.0.0.1", port))
        stalled.sendall(head + b"\x89PNG")
        while time.monotonic() < deadline:
            if _probe(client) == 429:
                return stalled
            if select.select([stalled], [], [], 0)[0]:  # answered: it lost the race
                break
            time.sleep(0.05)
        stalled.close()
    raise AssertionError("no stalled request took the slot")


def _probe(client: httpx.Client) -> int:
    """A request that needs a slot and then costs nothing: 400 (not an image) or 429."""
    return classify(client, b"x", "image/png", model=MODEL).status_code


def _wait_for(condition: Callable[[], bool], failure: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, failure
        time.sleep(0.1)
