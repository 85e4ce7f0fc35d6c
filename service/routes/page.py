"""The page at ``/``: a person's way to try the API from a browser.

Three static files in ``service/static/``, with no build step and nothing fetched from
anywhere else, so the page works offline and behind any firewall. It calls the same public
API a web app calls (``GET /v1/models``, ``POST /v1/classify``), so what it shows, errors
included, is what the API answers. ``GATEWAY_PAGE=false`` leaves it out
(docs/architecture.md, "The page").
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from ..errors import NotFound

STATIC = Path(__file__).resolve().parent.parent / "static"
#: Everything the page is made of; nothing else is served, whatever lies beside them.
FILES = {
    "index.html": "text/html; charset=utf-8",
    "page.css": "text/css; charset=utf-8",
    "page.js": "text/javascript; charset=utf-8",
}
#: The page may load only its own files, show the images a person picks (``blob:``) and
#: talk to this gateway: a proof, enforced by the browser, that it needs no CDN.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self' blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidated on every load (the ETag makes that cheap), so an upgrade shows at once.
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


def _file(name: str) -> FileResponse:
    return FileResponse(STATIC / name, media_type=FILES[name], headers=HEADERS)


@router.get("/")
async def index() -> FileResponse:
    return _file("index.html")


@router.get("/static/{name}")
async def static(name: str) -> FileResponse:
    if name not in FILES or name == "index.html":
        raise NotFound(f"no route /static/{name}")
    return _file(name)
