"""The playground against a service with an API key (in a file, as a mounted secret) and a small pixel limit."""

from __future__ import annotations

import pytest
from PIL import Image
from playwright.sync_api import expect
from ray import serve

from tests.browser.conftest import open_playground, press_segment, screenshot, upload
from tests.conftest import random_image
from tests.serve.app_runner import APP_NAME, cpu_config, serve_run

API_KEY = "browser-key-0123456789"
MAX_PIXELS = 200 * 200


@pytest.fixture(scope="module")
def app_url(ray_address, serve_port, tiny112_dir, tmp_path_factory):
    directory = tmp_path_factory.mktemp("api-key")
    key_file = directory / "api_key"
    key_file.write_text(API_KEY + "\n")
    config = cpu_config(str(tiny112_dir), serve_port)
    config["applications"][0]["args"].update(api_key_file=str(key_file), max_image_pixels=MAX_PIXELS)
    yield serve_run(config, directory / "config.yaml", ray_address)
    serve.delete(APP_NAME)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    directory = tmp_path_factory.mktemp("images")
    small, large = directory / "small.png", directory / "large.png"
    Image.fromarray(random_image(120, 160, seed=1)).save(small)
    Image.fromarray(random_image(250, 250, seed=2)).save(large)
    return small, large


def test_the_key_prompt_appears_and_the_key_is_sent(page, app_url, images):
    open_playground(page, app_url)
    expect(page.locator("#api-key-row")).to_be_visible()
    upload(page, images[0])
    page.fill("#text-prompt", "cat")
    press_segment(page)
    expect(page.locator("#error")).to_have_attribute("data-code", "unauthorized")
    expect(page.locator("#error-title")).to_have_text("This service needs a valid API key.")
    expect(page.locator("#api-key")).to_be_focused()
    screenshot(page, "api-key-missing")

    page.fill("#api-key", "wrong")
    press_segment(page)
    expect(page.locator("#error")).to_have_attribute("data-code", "unauthorized")

    page.fill("#api-key", API_KEY)
    press_segment(page)
    expect(page.locator("#error")).to_be_hidden()
    expect(page.locator("#results")).to_be_visible()
    assert page.locator("#instances li").count() > 0


def test_an_image_over_the_pixel_limit_shows_its_error(page, app_url, images):
    open_playground(page, app_url)
    page.fill("#api-key", API_KEY)
    upload(page, images[1])
    page.fill("#text-prompt", "cat")
    press_segment(page)
    expect(page.locator("#error")).to_have_attribute("data-code", "image_too_large")
    expect(page.locator("#error-title")).to_have_text("The image is too large for this service.")
    expect(page.locator("#error-detail")).to_contain_text(str(MAX_PIXELS))
    screenshot(page, "image-too-large")
