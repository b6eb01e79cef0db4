"""A real headless Chromium, driven by Playwright, against the real application (the Serve tests' fixtures).

The browser is the system's Chromium (Debian's `chromium`, which tests/run.sh installs): Playwright's own
browser download cannot be reached from CI. Every page runs with the network cut off beyond the
application's origin, so a page that needs the internet fails here as it would on an offline cluster.
Screenshots go to test-artifacts/browser/.
"""

from __future__ import annotations

import base64
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from playwright.sync_api import Page, sync_playwright

from tests.serve.app_runner import REPO
from tests.serve.conftest import app_url, http_client  # noqa: F401  (the application, one per test module)

ARTIFACTS = REPO / "test-artifacts" / "browser"
VIEWPORT = {"width": 1280, "height": 860}


def chromium_path() -> str:
    """Never skips: a missing browser is a failed test, with what to install."""
    path = os.environ.get("SAM3_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("no Chromium: install Debian's `chromium` (tests/run.sh does) or set SAM3_CHROMIUM")
    return path


@pytest.fixture(scope="module")
def browser():
    """Per module: Playwright's sync API runs an asyncio loop in this thread while it is open, and Serve
    handle calls (`.result()`) refuse to block inside a running loop, so it must not outlive the module."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, app_url) -> Iterator[Page]:  # noqa: F811
    """A fresh page; it fails the test on a JavaScript error or on any request beyond the application."""
    context = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
    outside: list[str] = []

    def only_the_application(route):
        if route.request.url.startswith(app_url + "/"):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    context.route("**/*", only_the_application)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert not outside, f"the page asked for something beyond the application: {outside}"
    assert not errors, f"JavaScript errors: {errors}"


def screenshot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def open_playground(page: Page, base_url: str) -> None:
    page.goto(f"{base_url}/playground")
    page.wait_for_function("() => window.playground !== undefined && window.playground.state.info !== null")


def upload(page: Page, image_path: Path) -> None:
    page.set_input_files("#file-input", str(image_path))
    page.wait_for_function("() => window.playground.state.image !== null")


def press_segment(page: Page) -> None:
    """Press Segment and wait until the page has handled the answer, whatever it was."""
    answered = int(page.get_attribute("body", "data-answered"))
    page.click("#segment")
    page.wait_for_function("(n) => Number(document.body.dataset.answered) > n", arg=answered, timeout=60_000)


def canvas_rgba(page: Page, canvas_id: str) -> np.ndarray:
    """The canvas's pixels, read back exactly: (H, W, 4) uint8."""
    read = page.evaluate(
        """(id) => {
            const canvas = document.getElementById(id);
            const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
            let text = "";
            for (let i = 0; i < data.length; i += 0x8000) text += String.fromCharCode(...data.subarray(i, i + 0x8000));
            return {width: canvas.width, height: canvas.height, data: btoa(text)};
        }""",
        canvas_id,
    )
    pixels = np.frombuffer(base64.b64decode(read["data"]), dtype=np.uint8)
    return pixels.reshape(read["height"], read["width"], 4)


def instance_colours(page: Page, count: int) -> list[tuple[int, int, int]]:
    colours = page.evaluate("(n) => Array.from({length: n}, (_, i) => playground.colourOf(i))", count)
    return [tuple(rgb) for rgb in colours]


def expected_overlay(masks: list[np.ndarray], colours: list[tuple[int, int, int]]) -> np.ndarray:
    """What the page must draw: each mask opaque in its colour, the best score (first) on top."""
    height, width = masks[0].shape
    overlay = np.zeros((height, width, 4), dtype=np.uint8)
    for mask, colour in reversed(list(zip(masks, colours))):
        overlay[mask > 0] = (*colour, 255)
    return overlay
