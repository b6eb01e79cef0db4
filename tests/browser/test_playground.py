"""The playground page in headless Chromium against the real application (tiny checkpoint, no API key).

What the page draws is read back from its mask canvas and compared pixel for pixel with the masks the
HTTP client gets for the same request. The tiny checkpoint's masks are meaningless (random weights),
which does not matter here: the page must draw exactly what the service answers. Bit for bit is what the
service guarantees here (`tests/answers.py`): the page's request and the client's go one after the other
on the same PNG, so both are answered from the features the replica cached for it (the client's by its
bytes or its `image_id`: either path reaches them), each in a batch of one: the same computation.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import expect
from skimage import data as sample_images

from client.rle import encode_mask
from tests.browser.conftest import (
    canvas_rgba,
    expected_overlay,
    instance_colours,
    open_playground,
    press_segment,
    screenshot,
    upload,
)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """scikit-image's chelsea (451 x 300), as the PNG file both the page and the client send."""
    path = tmp_path_factory.mktemp("photo") / "chelsea.png"
    Image.fromarray(sample_images.chelsea()).save(path)
    return path


@pytest.fixture
def playground(page, app_url, photo):
    open_playground(page, app_url)
    upload(page, photo)
    return page


def segment_text(page, text: str) -> None:
    page.fill("#text-prompt", text)
    press_segment(page)


def choose_kind(page, kind: str) -> None:
    page.check(f'input[name="prompt-kind"][value="{kind}"]')


def on_canvas(page, fx: float, fy: float) -> tuple[int, int]:
    """A whole viewport pixel at a fraction of the canvas's width and height."""
    box = page.locator("#annotation-layer").bounding_box()
    return round(box["x"] + fx * box["width"]), round(box["y"] + fy * box["height"])


def image_pixel(page, x: float, y: float) -> list[float]:
    """Where a viewport position falls on the image, which the stage scales to fit the page."""
    box = page.locator("#annotation-layer").bounding_box()
    width, height = page.evaluate("[playground.state.image.width, playground.state.image.height]")
    return [(x - box["x"]) * width / box["width"], (y - box["y"]) * height / box["height"]]


def assert_overlay_matches(page, masks: list[np.ndarray]) -> None:
    drawn = canvas_rgba(page, "mask-layer")
    expected = expected_overlay(masks, instance_colours(page, len(masks)))
    assert drawn.shape == expected.shape
    mismatched = np.argwhere((drawn != expected).any(axis=-1))
    assert len(mismatched) == 0, f"{len(mismatched)} pixels differ, first at (y, x) {mismatched[:5].tolist()}"


def test_page_says_the_checkpoint_is_random_and_asks_no_key(page, app_url):
    for path in ("/", "/playground"):
        page.goto(app_url + path)
        page.wait_for_function("() => window.playground !== undefined && window.playground.state.info !== null")
        expect(page.locator("#random-weights-banner")).to_be_visible()
        expect(page.locator("#random-weights-banner")).to_contain_text("random weights")
        expect(page.locator("#random-weights-banner")).to_contain_text("meaningless")
        expect(page.locator("#api-key-row")).to_be_hidden()
        expect(page.locator("#error")).to_be_hidden()


def test_a_dropped_image_opens(page, app_url, photo):
    open_playground(page, app_url)
    dropped = page.evaluate_handle(
        """(b64) => {
            const transfer = new DataTransfer();
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            transfer.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
            return transfer;
        }""",
        base64.b64encode(photo.read_bytes()).decode(),
    )
    page.dispatch_event("main", "drop", {"dataTransfer": dropped})
    page.wait_for_function("() => window.playground.state.image !== null")
    assert page.evaluate("[playground.state.image.name, playground.state.image.width]") == ["dropped.png", 451]
    expect(page.locator("#segment")).to_be_enabled()


def test_text_prompt_draws_the_clients_masks(playground, http_client, photo):
    segment_text(playground, "cat")
    expected = http_client.run_with_detections(photo, text="cat")
    assert expected["masks"], "the tiny checkpoint keeps instances for a text prompt"
    assert_overlay_matches(playground, expected["masks"])
    scores = [float(text) for text in playground.locator("#instances .score").all_inner_texts()]
    assert scores == pytest.approx(expected["scores"], abs=5e-4)
    assert scores == sorted(scores, reverse=True)
    expect(playground.locator("#timing")).to_contain_text("Request took")
    expect(playground.locator("#timing")).to_contain_text("server")
    screenshot(playground, "text-prompt")


def test_dragged_box_draws_the_clients_masks(playground, http_client, photo):
    choose_kind(playground, "boxes")
    start, end = on_canvas(playground, 0.25, 0.2), on_canvas(playground, 0.7, 0.85)
    playground.mouse.move(*start)
    playground.mouse.down()
    playground.mouse.move(*end, steps=5)
    playground.mouse.up()
    (sent,) = playground.evaluate("playground.state.boxes")
    assert sent["label"] == 1
    assert sent["coordinates"] == pytest.approx(image_pixel(playground, *start) + image_pixel(playground, *end), abs=1)
    press_segment(playground)
    expected = http_client.run_with_detections(photo, boxes=[sent["coordinates"]], labels=[1])
    assert expected["masks"]
    assert_overlay_matches(playground, expected["masks"])
    screenshot(playground, "box-prompt")


def test_clicked_points_draw_the_clients_mask(playground, http_client, photo):
    choose_kind(playground, "points")
    positive, negative = on_canvas(playground, 0.5, 0.5), on_canvas(playground, 0.15, 0.8)
    playground.mouse.click(*positive)
    playground.mouse.click(*negative, button="right")
    sent = playground.evaluate("playground.state.points")
    assert [point["label"] for point in sent] == [1, 0], "a click is positive, a right-click negative"
    points = [point["coordinates"] for point in sent]
    assert points[0] == pytest.approx(image_pixel(playground, *positive), abs=1)
    assert points[1] == pytest.approx(image_pixel(playground, *negative), abs=1)
    press_segment(playground)
    expected = http_client.run(photo, points=points, labels=[1, 0])
    assert expected.any()
    assert_overlay_matches(playground, [expected])
    screenshot(playground, "point-prompt")


def test_score_slider_hides_and_hover_highlights(playground, http_client, photo):
    segment_text(playground, "cat")
    expected = http_client.run_with_detections(photo, text="cat")
    scores = expected["scores"]
    # The slider moves in steps of 0.01: the first cut on that grid between two scores that keeps at least two.
    cuts = [round((higher + lower) / 2, 2) for higher, lower in zip(scores[1:], scores[2:])]
    cut = next((cut for cut in cuts if 2 <= sum(score >= cut for score in scores) < len(scores)), None)
    assert cut is not None, f"no slider position between two of the scores {scores}"
    kept = sum(score >= cut for score in scores)
    playground.locator("#min-score").fill(str(cut))
    expect(playground.locator("#instances li")).to_have_count(kept)
    assert_overlay_matches(playground, expected["masks"][:kept])

    playground.hover("#instances li:nth-child(2)")
    expect(playground.locator("#instances li:nth-child(2)")).to_have_class("highlighted")
    drawn = canvas_rgba(playground, "mask-layer")
    colours = instance_colours(playground, kept)
    assert (drawn[expected["masks"][1] > 0][:, :3] == colours[1]).all(), "the hovered instance is drawn on top"
    playground.mouse.move(0, 0)
    expect(playground.locator("#instances li.highlighted")).to_have_count(0)
    assert_overlay_matches(playground, expected["masks"][:kept])


def test_downloads_hold_the_clients_mask_and_detections(playground, http_client, photo):
    segment_text(playground, "cat")
    expected = http_client.run_with_detections(photo, text="cat")
    with playground.expect_download() as download:
        playground.click("#download-mask")
    assert download.value.suggested_filename == "chelsea-mask.png"
    mask = np.asarray(Image.open(io.BytesIO(download.value.path().read_bytes())).convert("L"))
    np.testing.assert_array_equal(mask, expected["union_mask"])
    with playground.expect_download() as download:
        playground.click("#download-json")
    detections = json.loads(download.value.path().read_text())
    assert detections["prompt"] == {"text": "cat"}
    assert [d["score"] for d in detections["instances"]] == pytest.approx(expected["scores"])
    np.testing.assert_allclose([d["box"] for d in detections["instances"]], expected["boxes"], atol=1e-3)
    for detection, mask in zip(detections["instances"], expected["masks"], strict=True):
        assert detection["mask"] == encode_mask(mask).model_dump(mode="json")


def test_a_bad_prompt_shows_its_error(playground):
    segment_text(playground, "cat " * 40)
    expect(playground.locator("#error")).to_be_visible()
    expect(playground.locator("#error")).to_have_attribute("data-code", "prompt_too_long")
    expect(playground.locator("#error-title")).to_have_text("The text prompt is too long for the model.")
    expect(playground.locator("#error-detail")).to_contain_text("token")
    expect(playground.locator("#results")).to_be_hidden()
    screenshot(playground, "prompt-too-long")


def test_an_unreachable_service_shows_a_message(playground):
    playground.route("**/v1/segment", lambda route: route.abort())
    segment_text(playground, "cat")
    expect(playground.locator("#error")).to_have_attribute("data-code", "connection_failed")
    expect(playground.locator("#error-title")).to_have_text("The service could not be reached.")


def test_typed_errors_read_as_messages(page, app_url):
    """The proxy's own 503 has a plain body; every typed error has a title of its own."""
    open_playground(page, app_url)
    describe = "([status, body, retryAfter]) => playground.describeError(status, body, retryAfter)"
    busy = page.evaluate(describe, [503, "Request dropped due to backpressure", "1"])
    assert busy["code"] == "unavailable"
    assert busy["title"] == "The service is busy or starting."
    assert "Try again in 1 s." in busy["detail"]
    too_large = json.dumps({"error": {"code": "image_too_large", "message": "image has 90000 pixels"}})
    assert page.evaluate(describe, [413, too_large, None])["title"] == "The image is too large for this service."
    no_key = json.dumps({"error": {"code": "unauthorized", "message": "no key"}})
    unauthorized = page.evaluate(describe, [401, no_key, None])
    assert unauthorized["title"] == "This service needs a valid API key."
    assert "Enter the service's API key" in unauthorized["detail"]
    bad_gateway = page.evaluate(describe, [502, "<html>bad gateway</html>", None])
    assert bad_gateway["title"] == "The service answered with HTTP 502."


def test_the_pages_rle_decoder_equals_pycocotools(page, app_url):
    """Empty, full, single-pixel and random masks, odd sizes, long runs (multi-character counts)."""
    open_playground(page, app_url)
    rng = np.random.default_rng(3)
    masks = [
        np.zeros((7, 5), np.uint8),
        np.ones((5, 7), np.uint8),
        np.pad(np.ones((1, 1), np.uint8), ((3, 4), (2, 6))),
        (rng.random((31, 17)) > 0.5).astype(np.uint8),
        (rng.random((300, 451)) > 0.97).astype(np.uint8),
        np.pad(np.ones((300, 200), np.uint8), ((150, 150), (80, 120))),
    ]
    for mask in masks:
        rle = encode_mask(mask).model_dump(mode="json")
        decoded = page.evaluate("(rle) => Array.from(playground.decodeRle(rle))", rle)
        np.testing.assert_array_equal(np.array(decoded, dtype=np.uint8).reshape(mask.shape), mask)


def test_api_docs_render_without_the_internet(page, app_url):
    page.goto(f"{app_url}/docs")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("SAM 3 segmentation")
    expect(page.locator(".opblock-summary-path", has_text="/v1/segment")).to_be_visible()
    screenshot(page, "docs")
