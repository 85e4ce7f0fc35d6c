"""The API as a web app on another origin calls it, in a real browser: allowed when the
origin is listed in GATEWAY_CORS_ORIGINS (the README's own `fetch` example), refused by the
browser when it is not, and with an API key when keys are set."""

from __future__ import annotations

import base64
import re
from typing import Any

import httpx
import pytest
from playwright.sync_api import Page

from ..gateway.helpers import MODEL, GatewayProcess, classify, photo
from ..helpers import ROOT
from .helpers import API_KEY, Origin, console_errors

pytestmark = pytest.mark.integration

PHOTO = photo("chelsea.png")
README_BASE = "http://127.0.0.1:8080"


def readme_example() -> str:
    """The README's `fetch` example for web apps on other origins: the one block of
    JavaScript there that defines `classify`."""
    blocks = re.findall(r"```js\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    (block,) = [b for b in blocks if "async function classify(" in b]
    assert README_BASE in block
    return block


def open_app(page: Page, origin: Origin, gateway: GatewayProcess) -> None:
    """A page of `origin` with the README's `classify` pointed at `gateway`, and `PHOTO` as
    the File a person would have picked."""
    page.goto(origin.app)
    page.add_script_tag(content=readme_example().replace(README_BASE, gateway.url))
    page.evaluate(
        """b64 => { const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
                    window.photo = new File([bytes], "chelsea.png", {type: "image/png"}); }""",
        base64.b64encode(PHOTO.read_bytes()).decode(),
    )


def readme_classify(page: Page, **options: Any) -> dict[str, Any]:
    """Runs the README's `classify(photo, options)`: its answer, or what it threw."""
    return page.evaluate(
        """async options => {
             try { return {answer: await classify(window.photo, options)}; }
             catch (failure) { return {thrown: `${failure.name}: ${failure.message}`}; } }""",
        options,
    )


#: A JSON body with the request-id header: a preflight, then the answer's exposed headers.
FETCH_JSON = """async ({url, headers, body}) => {
  try {
    const answer = await fetch(url, {
      method: "POST", headers: {"Content-Type": "application/json", ...headers}, body: JSON.stringify(body)});
    return {status: answer.status, body: await answer.json(),
            requestId: answer.headers.get("X-Request-ID"), retryAfter: answer.headers.get("Retry-After")};
  } catch (failure) { return {thrown: `${failure.name}: ${failure.message}`}; }
}"""


def fetch_json(page: Page, url: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    image = base64.b64encode(PHOTO.read_bytes()).decode()
    body = {"image": image, "model": MODEL, "top_k": 3}
    return page.evaluate(FETCH_JSON, {"url": url + "/v1/classify", "headers": headers or {}, "body": body})


def test_a_listed_origin_runs_the_readme_example(
    page: Page, listed_origin: Origin, page_gateway: GatewayProcess
) -> None:
    open_app(page, listed_origin, page_gateway)
    result = readme_classify(page, model=MODEL, topK=4)
    with page_gateway.client() as client:
        direct = classify(client, PHOTO.read_bytes(), "image/png", model=MODEL, top_k=4).json()
    assert "answer" in result, result
    assert result["answer"]["predictions"] == direct["predictions"]
    assert result["answer"]["weights"] == direct["weights"]


def test_a_listed_origin_sends_json_and_reads_the_request_id(
    page: Page, listed_origin: Origin, page_gateway: GatewayProcess
) -> None:
    page.goto(listed_origin.app)
    result = fetch_json(page, page_gateway.url, {"X-Request-ID": "from-a-web-app-1"})
    assert result.get("status") == 200, result
    assert len(result["body"]["predictions"]) == 3
    assert result["requestId"] == "from-a-web-app-1"  # exposed, so the app can quote it


def test_a_listed_origin_reads_429_and_retry_after(
    page: Page, listed_origin: Origin, page_gateway: GatewayProcess, held_slot: None
) -> None:
    page.goto(listed_origin.app)
    result = fetch_json(page, page_gateway.url)
    assert result.get("status") == 429, result
    assert result["body"]["error"]["code"] == "overloaded" and result["retryAfter"]


def test_an_unlisted_origin_is_refused_by_the_browser(
    page: Page, other_origin: Origin, page_gateway: GatewayProcess
) -> None:
    open_app(page, other_origin, page_gateway)
    with console_errors(page) as errors:
        refused = readme_classify(page, model=MODEL)
        preflighted = fetch_json(page, page_gateway.url, {"X-Request-ID": "from-elsewhere"})
    assert refused == {"thrown": "TypeError: Failed to fetch"}
    assert preflighted == {"thrown": "TypeError: Failed to fetch"}
    assert len([e for e in errors if "blocked by CORS policy" in e and other_origin.url in e]) >= 2, errors
    # The gateway did answer; it is the browser that withheld the answer, for want of the header.
    answer = httpx.get(page_gateway.url + "/v1/models", headers={"Origin": other_origin.url})
    assert answer.status_code == 200 and "access-control-allow-origin" not in answer.headers


def test_a_listed_origin_with_an_api_key(
    page: Page, listed_origin: Origin, keyed_gateway: GatewayProcess
) -> None:
    open_app(page, listed_origin, keyed_gateway)
    without = readme_classify(page, model=MODEL)
    assert without == {"thrown": "Error: 401 unauthorized: a valid API key is required"}
    with_key = readme_classify(page, model=MODEL, apiKey=API_KEY)
    assert "answer" in with_key, with_key
    assert len(with_key["answer"]["predictions"]) == 5
    bearer = fetch_json(page, keyed_gateway.url, {"Authorization": f"Bearer {API_KEY}"})
    assert bearer.get("status") == 200, bearer
    wrong = fetch_json(page, keyed_gateway.url, {"X-API-Key": API_KEY + "-wrong"})
    assert wrong.get("status") == 401 and wrong["body"]["error"]["code"] == "unauthorized"
