"""Helpers of the browser tests: where screenshots go, the page gateway's limits and key,
the second origins, and the console errors a page logs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from playwright.sync_api import Page

from ..helpers import ROOT

SCREENSHOTS = ROOT / "build" / "browser"
#: The page gateway's body limit: a packaged photo fits (chelsea.png, 240 KB), another does
#: not (astronaut.png, 792 KB).
MAX_BODY_BYTES = 500_000
API_KEY = "browser-test-key"


@dataclass(frozen=True)
class Origin:
    """A page on another local origin, from which a web app calls the gateway."""

    url: str

    @property
    def app(self) -> str:
        return self.url + "/app.html"


@contextlib.contextmanager
def console_errors(page: Page) -> Iterator[list[str]]:
    """The console errors the page logs meanwhile (chromium reports CORS refusals there)."""
    messages: list[str] = []

    def keep(message: object) -> None:
        if getattr(message, "type", "") == "error":
            messages.append(str(getattr(message, "text", "")))

    page.on("console", keep)
    try:
        yield messages
    finally:
        page.remove_listener("console", keep)
