"""The page at `/` in a real browser: a packaged photo in, bars, provenance and timings out;
the API's own error messages shown word for word; usable by keyboard; a key when the
gateway asks for one."""

from __future__ import annotations

import base64
import io

import httpx
import pytest
from PIL import Image
from playwright.sync_api import Page, expect

from ..gateway.helpers import MODEL, GatewayProcess, classify, photo
from .helpers import API_KEY, MAX_BODY_BYTES, SCREENSHOTS

pytestmark = pytest.mark.integration

PHOTO = photo("chelsea.png")  # 240 KB, under the page gateway's limit
TOO_LARGE = photo("astronaut.png")  # 792 KB, over it


def open_page(page: Page, gateway: GatewayProcess) -> list[str]:
    """Loads the page and waits for the model list; returns the list that collects every
    URL the page requests from then on."""
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(gateway.url + "/")
    expect(page.get_by_label("Model").locator("option[value='custom']")).to_be_attached()
    return requested


def submit(page: Page) -> None:
    """Clicks Classify and waits for the answer: the button is disabled while a request is
    in flight (the page gateway has one slot, so a second request meanwhile would be 429)."""
    button = page.get_by_role("button", name="Classify")
    button.click()
    expect(button).to_be_enabled()


def api_error(answer: httpx.Response) -> str:
    """What the page must show for an error answer: status, code and message as sent."""
    error = answer.json()["error"]
    retry = answer.headers.get("Retry-After")
    return f"{answer.status_code} {error['code']}: {error['message']}" + (
        f" (retry after {retry} s)" if retry else ""
    )


def test_a_photo_gets_bars_provenance_and_timings(page: Page, page_gateway: GatewayProcess) -> None:
    requested = open_page(page, page_gateway)
    page.get_by_label("Model").select_option("inception_ensemble")
    page.get_by_label("Image").set_input_files(PHOTO)
    expect(page.get_by_alt_text("Preview of chelsea.png")).to_be_visible()
    assert page.eval_on_selector("#preview", "img => img.naturalWidth") == 451
    page.get_by_label("Top-k").fill("3")
    submit(page)
    result = page.get_by_role("region", name="Result")
    expect(result).to_be_visible()

    with page_gateway.client() as client:
        same = classify(client, PHOTO.read_bytes(), "image/png", model="inception_ensemble", top_k=3)
    assert same.status_code == 200, same.text
    expected = same.json()
    rows = result.get_by_role("listitem").filter(has=page.locator(".bar"))
    expect(rows).to_have_count(3)
    for row, prediction in zip(rows.all(), expected["predictions"], strict=True):
        expect(row.locator(".label")).to_have_text(prediction["label"])
        expect(row.locator(".pct")).to_have_text(f"{prediction['score'] * 100:.2f} %")
        width = row.locator(".bar span").evaluate("bar => bar.style.width")
        assert float(width.rstrip("%")) == pytest.approx(prediction["score"] * 100, rel=1e-4)

    provenance = dict(zip(result.locator("#provenance dt").all_inner_texts(),
                          result.locator("#provenance dd").all_inner_texts(), strict=True))  # fmt: skip
    assert provenance["model"] == expected["model"] and provenance["weights"] == expected["weights"]
    for member in expected["members"]:
        assert provenance[f"member {member['model']}"] == f"× {member['weight']:.4g} · {member['weights']}"
    assert result.locator("#timings dt").all_inner_texts() == list(expected["timing_ms"])
    assert {"decode", "triton", "total"} <= set(expected["timing_ms"])
    for value in result.locator("#timings dd").all_inner_texts():
        assert float(value) >= 0

    warning = page.get_by_role("alert").filter(has_text="Random initialisation")
    if expected["random_init"]:  # `make test` serves random weights unless given checkpoints
        expect(warning).to_be_visible()
        expect(warning).to_contain_text(expected["warning"])
    else:
        expect(warning).to_have_count(0)

    # Offline by construction: the page asked nothing of any other origin (its preview is
    # a `blob:` URL of its own origin).
    own = [url.removeprefix("blob:") for url in requested]
    assert own and all(url.startswith(page_gateway.url + "/") for url in own), requested
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shot = SCREENSHOTS / "page.png"
    page.screenshot(path=str(shot), full_page=True)
    # The README's copy (docs/page.png): 256 colours keep it under 200 KB and legible.
    small = SCREENSHOTS / "page-readme.png"
    Image.open(shot).convert("RGB").quantize(256).save(small, optimize=True)
    assert 10_000 < small.stat().st_size <= 200_000


def test_members_and_weights_of_ones_choice(page: Page, page_gateway: GatewayProcess) -> None:
    open_page(page, page_gateway)
    members = page.get_by_role("group", name="Members and their weights")
    expect(members).to_be_hidden()
    page.get_by_label("Model").select_option("custom")
    expect(members).to_be_visible()
    members.get_by_label("inception_v4", exact=True).uncheck()
    members.get_by_label("weight of inception_resnet_v2").fill("3")
    page.get_by_label("Image").set_input_files(PHOTO)
    submit(page)
    with page_gateway.client() as client:
        params = {"models": f"{MODEL},inception_resnet_v2", "weights": "1,3"}
        same = classify(client, PHOTO.read_bytes(), "image/png", **params)
    assert same.status_code == 200, same.text
    expected = same.json()
    provenance = page.locator("#provenance")
    expect(provenance.locator("dd").first).to_have_text(expected["model"])
    for member in expected["members"]:
        expect(provenance).to_contain_text(
            f"member {member['model']}× {member['weight']:.4g} · {member['weights']}"
        )
    expect(page.locator("#predictions .label")).to_have_text([p["label"] for p in expected["predictions"]])


def test_crops_are_offered_exactly_when_the_api_advertises_them(
    page: Page, page_gateway: GatewayProcess
) -> None:
    open_page(page, page_gateway)
    with page_gateway.client() as client:
        protocols = client.get("/v1/models").json().get("crops") or {}
        post = client.get("/openapi.json").json()["paths"]["/v1/classify"]["post"]
    takes_crops = any(p["name"] == "crops" for p in post.get("parameters", []))
    crops = page.get_by_label("Crops")
    if not (protocols and takes_crops):
        expect(crops).to_be_hidden()
        return
    values = sorted(protocols, key=int)
    expect(crops.locator("option")).to_have_count(len(values))
    assert crops.locator("option").evaluate_all("options => options.map(o => o.value)") == values
    page.get_by_label("Model").select_option(MODEL)
    page.get_by_label("Image").set_input_files(PHOTO)
    crops.select_option(values[1] if len(values) > 1 else values[0])
    submit(page)
    with page_gateway.client() as client:
        same = classify(client, PHOTO.read_bytes(), "image/png", model=MODEL, crops=crops.input_value())
    assert same.status_code == 200, same.text
    expect(page.locator("#provenance")).to_contain_text(f"crops{same.json()['crops']}")
    expect(page.locator("#predictions .label").first).to_have_text(same.json()["predictions"][0]["label"])


def test_a_non_image_shows_the_415_message(page: Page, page_gateway: GatewayProcess) -> None:
    open_page(page, page_gateway)
    text = b"not an image, just notes\n"
    notes = {"name": "notes.txt", "mimeType": "text/plain", "buffer": text}
    page.get_by_label("Image").set_input_files(notes)
    submit(page)
    with page_gateway.client() as client:
        answer = classify(client, text, "text/plain", model=MODEL)
    assert answer.status_code == 415
    expect(page.locator("#error")).to_have_text(api_error(answer))
    expect(page.get_by_role("region", name="Result")).to_be_hidden()


def test_a_photo_over_the_limit_shows_the_413_message(page: Page, page_gateway: GatewayProcess) -> None:
    assert TOO_LARGE.stat().st_size > MAX_BODY_BYTES
    open_page(page, page_gateway)
    page.get_by_label("Image").set_input_files(TOO_LARGE)
    submit(page)
    with page_gateway.client() as client:
        answer = classify(client, TOO_LARGE.read_bytes(), "image/png", model=MODEL)
    assert answer.status_code == 413
    expect(page.locator("#error")).to_have_text(api_error(answer))


def test_an_overloaded_gateway_shows_the_429_message(
    page: Page, page_gateway: GatewayProcess, held_slot: None
) -> None:
    open_page(page, page_gateway)
    page.get_by_label("Image").set_input_files(PHOTO)
    submit(page)
    with page_gateway.client() as client:
        answer = classify(client, PHOTO.read_bytes(), "image/png", model=MODEL)
    assert answer.status_code == 429 and answer.headers["Retry-After"]
    expect(page.locator("#error")).to_have_text(api_error(answer))


@pytest.mark.parametrize(
    ("event", "target"),
    [("drop", "#drop"), ("paste", "body")],
)
def test_an_image_can_be_dropped_or_pasted(
    page: Page, page_gateway: GatewayProcess, event: str, target: str
) -> None:
    open_page(page, page_gateway)
    data = base64.b64encode(PHOTO.read_bytes()).decode()
    page.locator(target).evaluate(
        """(element, [event, data]) => {
             const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
             const transfer = new DataTransfer();
             transfer.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
             const init = {bubbles: true, cancelable: true};
             element.dispatchEvent(event === "drop"
               ? new DragEvent("drop", {...init, dataTransfer: transfer})
               : new ClipboardEvent("paste", {...init, clipboardData: transfer}));
           }""",
        [event, data],
    )
    expect(page.get_by_alt_text("Preview of dropped.png")).to_be_visible()
    expect(page.get_by_role("status")).to_have_text(
        f"dropped.png: {PHOTO.stat().st_size} bytes, ready to classify."
    )


def test_the_page_works_by_keyboard_alone(page: Page, page_gateway: GatewayProcess) -> None:
    # Listening before the page loads: chromium intercepts file choosers only once the
    # listener is registered, and `expect_file_chooser` around the key press lost that race.
    page.on("filechooser", lambda chooser: chooser.set_files(PHOTO))
    open_page(page, page_gateway)
    page.keyboard.press("Tab")  # the link to the API reference
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "file"
    page.keyboard.press("Space")  # opens the file chooser, which the listener answers
    expect(page.get_by_alt_text("Preview of chelsea.png")).to_be_visible()
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "model"
    page.get_by_label("Model").select_option(MODEL)  # a focused <select> is the keyboard's
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "top_k"
    page.keyboard.press("Control+A")
    page.keyboard.type("2")
    page.keyboard.press("Enter")  # submits the form
    expect(page.get_by_role("region", name="Result").get_by_role("listitem")).not_to_have_count(0)
    expect(page.locator("#predictions li")).to_have_count(2)
    # The answer takes the focus, so a screen reader reads it next.
    assert page.evaluate("document.activeElement.id") == "result-title"


def test_a_phone_sees_one_column(page: Page, page_gateway: GatewayProcess) -> None:
    page.set_viewport_size({"width": 390, "height": 844})
    open_page(page, page_gateway)
    form = page.locator("#form").bounding_box()
    assert form is not None and form["width"] <= 390
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing spills sideways


def test_the_key_field_unlocks_a_keyed_gateway(page: Page, keyed_gateway: GatewayProcess) -> None:
    page.goto(keyed_gateway.url + "/")
    with keyed_gateway.client() as client:
        refused = client.get("/v1/models")
    assert refused.status_code == 401
    expect(page.locator("#error")).to_have_text("Cannot list the models: " + api_error(refused))
    key = page.get_by_label("API key")
    expect(key).to_be_focused()
    key.fill(API_KEY)
    key.press("Tab")  # `change`: the key is kept in this tab and the models are listed again
    expect(page.get_by_label("Model").locator(f"option[value='{MODEL}']")).to_be_attached()
    expect(page.locator("#error")).to_be_hidden()
    page.get_by_label("Model").select_option(MODEL)
    page.get_by_label("Image").set_input_files(PHOTO)
    submit(page)
    expect(page.locator("#predictions li")).to_have_count(5)
    page.reload()
    expect(page.get_by_label("API key")).to_have_value(API_KEY)
    expect(page.get_by_label("Model").locator(f"option[value='{MODEL}']")).to_be_attached()


def test_several_files_are_one_batch_with_a_result_per_image(
    page: Page, page_gateway: GatewayProcess
) -> None:
    """Three files chosen at once go as one multipart batch; the page shows each image's
    bars, or its own error as the API words it, in the order chosen."""
    requested = open_page(page, page_gateway)
    small = io.BytesIO()
    Image.new("RGB", (64, 48), (30, 120, 200)).save(small, "JPEG")
    files = [
        {"name": "chelsea.png", "mimeType": "image/png", "buffer": PHOTO.read_bytes()},
        {"name": "notes.png", "mimeType": "image/png", "buffer": b"not an image, just notes\n"},
        {"name": "blue.jpg", "mimeType": "image/jpeg", "buffer": small.getvalue()},
    ]
    page.get_by_label("Model").select_option(MODEL)
    page.get_by_label("Image").set_input_files(files)
    expect(page.locator("#status")).to_contain_text("3 images")
    page.get_by_label("Top-k").fill("2")
    submit(page)
    result = page.get_by_role("region", name="Result")
    expect(result).to_be_visible()
    with page_gateway.client() as client:
        parts = [("image", (f["name"], f["buffer"], f["mimeType"])) for f in files]
        same = client.post("/v1/classify", files=parts, params={"model": MODEL, "top_k": 2})
    assert same.status_code == 200, same.text
    expected = same.json()["results"]
    articles = result.locator("#batch article")
    expect(articles).to_have_count(3)
    expect(result.locator("#predictions")).to_be_hidden()
    for article, file, answer in zip(articles.all(), files, expected, strict=True):
        expect(article.locator("h3")).to_contain_text(file["name"])
        if answer["error"]:
            error = answer["error"]
            expect(article.locator(".error")).to_have_text(f"{error['code']}: {error['message']}")
        else:
            labels = [p["label"] for p in answer["predictions"]]
            expect(article.locator(".label")).to_have_text(labels)
    assert [a["error"] is not None for a in expected] == [False, True, False]
    posts = [url for url in requested if "/v1/classify" in url]
    assert len(posts) == 1, posts  # one request for the three
