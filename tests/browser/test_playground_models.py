"""The playground's model selector, its `max_instances` field, and image ids on follow-up prompts, in headless
Chromium against an application that serves two tiny checkpoints (112 px as `sam3`, the default, and 56 px as
`small`). Their masks are meaningless (random weights): the page must draw what the service answers.

Each request the page sends is read as it leaves (its JSON body), and the answers' `timings_ms["vision"]`
say whether the service ran the ViT for it (0: the image's features came from the replica's cache).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image
from playwright.sync_api import Page, expect
from ray import serve

from tests.browser.conftest import canvas_rgba, expected_overlay, instance_colours, open_playground, press_segment, upload
from tests.conftest import random_image, tiny_checkpoint_dir
from tests.serve.app_runner import APP_NAME, cpu_config, serve_run

SEGMENT_PATH = "/v1/segment"


@pytest.fixture(scope="module")
def checkpoints() -> dict[str, Path]:
    return {"sam3": tiny_checkpoint_dir(112), "small": tiny_checkpoint_dir(56)}


@pytest.fixture(scope="module")
def app_url(ray_address, serve_port, checkpoints, tmp_path_factory):
    config = cpu_config(str(checkpoints["sam3"]), serve_port)
    config["applications"][0]["args"].update(
        models={model_id: str(path) for model_id, path in checkpoints.items()}, default_model="sam3"
    )
    url = serve_run(config, tmp_path_factory.mktemp("models") / "config.yaml", ray_address)
    wait_until_loaded(url, "sam3")
    yield url
    serve.delete(APP_NAME)


def wait_until_loaded(url: str, model_id: str, timeout_s: float = 30) -> None:
    """Until `/v1/info` says a replica holds the model: the ingress hears it from Serve's controller, which
    hears it from the replica, within seconds of the replica's start."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        models = {model["model_id"]: model for model in httpx.get(url + "/v1/info").json()["models"]}
        if models[model_id]["loaded_replicas"] > 0:
            return
        time.sleep(0.25)
    raise AssertionError(f"/v1/info did not report {model_id} loaded within {timeout_s} s")


@pytest.fixture
def new_photo(tmp_path):
    """A photo no earlier test sent, so that its first request runs the ViT: each test gets its own."""
    seed = sum(map(ord, tmp_path.name))
    path = tmp_path / "photo.png"
    Image.fromarray(random_image(150, 200, seed=seed)).save(path)
    return path


def sent_bodies(page: Page) -> list[dict]:
    """The JSON body of every POST /v1/segment the page sends from now on, in order."""
    bodies: list[dict] = []
    page.on("request", lambda request: bodies.append(json.loads(request.post_data)) if request.url.endswith(SEGMENT_PATH) else None)
    return bodies


def answer_timings(page: Page) -> dict[str, float]:
    return page.evaluate("playground.state.result.response.timings_ms")


def segment_text(page: Page, text: str) -> None:
    page.fill("#text-prompt", text)
    press_segment(page)


def assert_draws(page: Page, masks) -> None:
    drawn = canvas_rgba(page, "mask-layer")
    expected = expected_overlay(masks, instance_colours(page, len(masks)))
    assert (drawn == expected).all(), f"{int((drawn != expected).any(axis=-1).sum())} pixels differ"


def test_the_selector_lists_every_model_and_the_chosen_one_answers(page, app_url, checkpoints, http_client, new_photo):
    open_playground(page, app_url)
    expect(page.locator("#model-row")).to_be_visible()
    labels = page.locator("#model option").all_inner_texts()
    assert labels == [
        f"sam3 (default): {checkpoints['sam3'].name}, 112 px",
        f"small: {checkpoints['small'].name}, 56 px",
    ]
    expect(page.locator("#checkpoint")).to_have_text(f"checkpoint: {checkpoints['sam3'].name}")
    expect(page.locator("#model-note")).to_have_text("Loaded on 1 replica(s).")

    page.select_option("#model", "small")
    expect(page.locator("#checkpoint")).to_have_text(f"checkpoint: {checkpoints['small'].name}")
    expect(page.locator("#random-weights-banner")).to_be_visible()
    bodies = sent_bodies(page)
    upload(page, new_photo)
    segment_text(page, "cat")
    assert bodies[-1]["model_id"] == "small" and "image" in bodies[-1]
    expected = http_client.run_with_detections(new_photo, text="cat", model_id="small")
    assert expected["masks"], "the tiny checkpoint keeps instances for a text prompt"
    assert_draws(page, expected["masks"])
    default = http_client.run_with_detections(new_photo, text="cat")
    assert len(default["masks"]) != len(expected["masks"]) or any(
        (a != b).any() for a, b in zip(default["masks"], expected["masks"])
    ), "the two checkpoints must answer differently, or the test says little"


def test_a_follow_up_prompt_sends_the_image_id_and_skips_the_vit(page, app_url, http_client, new_photo):
    open_playground(page, app_url)
    bodies = sent_bodies(page)
    upload(page, new_photo)
    segment_text(page, "cat")
    first = answer_timings(page)
    assert "image" in bodies[0] and "image_id" not in bodies[0]
    assert first["vision"] > 0, "a new image goes through the ViT"

    segment_text(page, "striped dog")
    image_id = page.evaluate("playground.state.result.response.image_id")
    assert bodies[1]["image_id"] == image_id and "image" not in bodies[1]
    assert answer_timings(page)["vision"] == 0, "the follow-up's image features came from the cache"
    expect(page.locator("#timing")).to_contain_text("vision features came from the service's cache")
    assert_draws(page, http_client.run_with_detections(new_photo, text="striped dog")["masks"])

    page.check('input[name="prompt-kind"][value="points"]')
    box = page.locator("#annotation-layer").bounding_box()
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    press_segment(page)
    assert bodies[2]["image_id"] == image_id and "image" not in bodies[2]
    assert answer_timings(page)["vision"] == 0


def test_an_image_the_service_let_go_is_sent_again(page, app_url, http_client, new_photo):
    """The page holds an id the service no longer has (as after an eviction): it gets 404 image_not_cached
    and sends the image again, as the Python clients do; the user sees only the answer."""
    open_playground(page, app_url)
    upload(page, new_photo)
    width, height = Image.open(new_photo).size
    page.evaluate("(id) => playground.state.image.ids.set('sam3', id)", f"{'0' * 32}-{width}x{height}")
    bodies = sent_bodies(page)
    segment_text(page, "cat")
    assert [("image_id" in body, "image" in body) for body in bodies] == [(True, False), (False, True)]
    expect(page.locator("#error")).to_be_hidden()
    assert answer_timings(page)["vision"] > 0
    assert_draws(page, http_client.run_with_detections(new_photo, text="cat")["masks"])


def test_at_most_n_instances_is_sent_and_answered(page, app_url, http_client, new_photo):
    open_playground(page, app_url)
    bodies = sent_bodies(page)
    upload(page, new_photo)
    page.fill("#max-instances", "2")
    segment_text(page, "cat")
    assert bodies[-1]["max_instances"] == 2
    expected = http_client.run_with_detections(new_photo, text="cat", max_instances=2)
    assert len(expected["masks"]) == 2, "the tiny checkpoint keeps more than two instances, or the test says little"
    expect(page.locator("#instances li")).to_have_count(2)
    assert_draws(page, expected["masks"])

    page.fill("#max-instances", "0")
    page.click("#segment")
    expect(page.locator("#error")).to_have_attribute("data-code", "incomplete_prompt")
    assert len(bodies) == 1, "a bad count is refused in the page, before anything is sent"

    page.check('input[name="prompt-kind"][value="points"]')
    expect(page.locator("#max-instances-row")).to_be_hidden()
