"""Every bad input gets its documented answer, through HTTP and through the handle; auth; deadlines.

The application runs from serve_config.yaml's CPU profile with small limits, an API key in a file, and the
vision-feature cache off: the ingress then passes the preprocessor's response straight on, so a request the
preprocessor refuses has its error carried through the model pool and the postprocessor (with the cache on, as
in `test_run_many.py`, the ingress reads it first).
"""

from __future__ import annotations

import base64
import io
import struct
import time
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image
from ray import serve

from client import Sam3HandleClient, Sam3HttpClient
from client.errors import (
    ImageTooLargeError,
    InvalidImageError,
    InvalidPromptError,
    PromptTooLongError,
    RequestTimeoutError,
    Sam3Error,
)
from client.protocol import SegmentRequest
from tests.conftest import random_image
from tests.serve.app_runner import APP_NAME, cpu_config, deployment, model_pool_batch_sizes, serve_run

API_KEY = "test-key-0123456789"
MAX_PIXELS = 200 * 200
MAX_BODY_BYTES = 2_000_000
MAX_ITEMS = 4
IMAGE = random_image(60, 80, seed=5)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares its size but holds almost no pixel data: a decompression bomb's shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def app_config(serve_port, tiny112_dir, tmp_path_factory):
    directory = tmp_path_factory.mktemp("bad-input")
    key_file = directory / "api_key"
    key_file.write_text(API_KEY + "\n")
    config = cpu_config(str(tiny112_dir), serve_port)
    config["applications"][0]["args"].update(
        max_image_pixels=MAX_PIXELS,
        max_body_bytes=MAX_BODY_BYTES,
        max_prompt_items=MAX_ITEMS,
        api_key_file=str(key_file),
        vision_cache_bytes=0,
    )
    return config, directory / "config.yaml"


@pytest.fixture(scope="module")
def app_url(ray_address, app_config):
    yield serve_run(*app_config, ray_address)
    serve.delete(APP_NAME)


@pytest.fixture(scope="module")
def http(app_url):
    with httpx.Client(base_url=app_url, timeout=60, headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        yield client


def post(http, body: dict, **kwargs) -> httpx.Response:
    return http.post("/v1/segment", json=body, **kwargs)


def image_b64(data: bytes = None) -> str:
    return base64.b64encode(png_bytes(IMAGE) if data is None else data).decode()


# (request fields, HTTP status, error code, exception the clients raise)
BAD_PROMPTS = {
    "no_prompt": ({}, 422, "invalid_prompt", InvalidPromptError),
    "text_and_points": ({"text": "cat", "points": [[1, 2]], "labels": [1]}, 422, "invalid_prompt", InvalidPromptError),
    "points_and_boxes": (
        {"points": [[1, 2]], "boxes": [[1, 2, 3, 4]], "labels": [1]}, 422, "invalid_prompt", InvalidPromptError
    ),
    "labels_missing": ({"points": [[1, 2]]}, 422, "invalid_prompt", InvalidPromptError),
    "labels_wrong_length": ({"points": [[1, 2], [3, 4]], "labels": [1]}, 422, "invalid_prompt", InvalidPromptError),
    "label_not_0_or_1": ({"boxes": [[1, 2, 30, 40]], "labels": [2]}, 422, "invalid_prompt", InvalidPromptError),
    "point_wrong_shape": ({"points": [[1, 2, 3]], "labels": [1]}, 422, "invalid_prompt", InvalidPromptError),
    "box_wrong_shape": ({"boxes": [[1, 2, 3]], "labels": [1]}, 422, "invalid_prompt", InvalidPromptError),
    "empty_points": ({"points": [], "labels": []}, 422, "invalid_prompt", InvalidPromptError),
    "zero_area_box": ({"boxes": [[10, 10, 10, 30]], "labels": [1]}, 422, "invalid_prompt", InvalidPromptError),
    "inverted_box": ({"boxes": [[40, 30, 10, 10]], "labels": [1]}, 422, "invalid_prompt", InvalidPromptError),
    "infinite_coordinate": ({"points": [[1e39, 2]], "labels": [1]}, 422, "invalid_prompt", InvalidPromptError),
    "too_many_points": (
        {"points": [[i, i] for i in range(MAX_ITEMS + 1)], "labels": [1] * (MAX_ITEMS + 1)},
        422, "invalid_prompt", InvalidPromptError,
    ),
    "too_many_boxes": (
        {"boxes": [[i, i, i + 5, i + 5] for i in range(MAX_ITEMS + 1)], "labels": [1] * (MAX_ITEMS + 1)},
        422, "invalid_prompt", InvalidPromptError,
    ),
    "empty_text": ({"text": "  "}, 422, "invalid_prompt", InvalidPromptError),
    "text_over_token_limit": ({"text": "cat " * 40}, 422, "prompt_too_long", PromptTooLongError),
}

BAD_IMAGES = {
    "undecodable": (b"this is not an image", 400, "invalid_image", InvalidImageError),
    "truncated": (png_bytes(IMAGE)[:200], 400, "invalid_image", InvalidImageError),
    "zero_size": (png_header_only(0, 10), 400, "invalid_image", InvalidImageError),
    "over_pixel_limit": (png_bytes(random_image(250, 250)), 413, "image_too_large", ImageTooLargeError),
    "decompression_bomb": (png_header_only(100_000, 100_000), 413, "image_too_large", ImageTooLargeError),
}


@pytest.mark.parametrize("case", sorted(BAD_PROMPTS))
def test_bad_prompts(case, http, app_url):
    fields, status, code, error_type = BAD_PROMPTS[case]
    response = post(http, {"image": image_b64(), **fields})
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert response.json()["error"]["message"]
    with pytest.raises(error_type):
        Sam3HandleClient(APP_NAME)._segment(SegmentRequest(image=png_bytes(IMAGE), **fields), timeout=60)


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_bad_images(case, http):
    """Refused by the preprocessor; the refusal passes through the model pool without joining a batch."""
    data, status, code, error_type = BAD_IMAGES[case]
    before = model_pool_batch_sizes()
    response = post(http, {"image": image_b64(data), "text": "cat"})
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    with pytest.raises(error_type):
        Sam3HandleClient(APP_NAME)._segment(SegmentRequest(image=data, text="cat"), timeout=60)
    assert model_pool_batch_sizes() == before


def test_not_a_number_in_json(http):
    body = '{"image": "%s", "points": [[NaN, 2]], "labels": [1]}' % image_b64()
    response = http.post("/v1/segment", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code in (400, 422), response.text
    assert response.json()["error"]["code"] in ("invalid_request", "invalid_prompt")


def test_coordinates_outside_the_image(http):
    """Documented choice: like transformers, coordinates outside the image are used as given, not clipped,
    up to one image size beyond each edge; further out they are refused (they crash box pooling)."""
    response = post(http, {"image": image_b64(), "boxes": [[-20, -10, 150, 110]], "labels": [1]})
    assert response.status_code == 200, response.text
    response = post(http, {"image": image_b64(), "points": [[-5, 110]], "labels": [0]})
    assert response.status_code == 200, response.text
    for far in ({"boxes": [[0, 0, 1e20, 1]], "labels": [1]}, {"points": [[3.4e38, 0.5]], "labels": [1]}):
        response = post(http, {"image": image_b64(), **far})
        assert response.status_code == 422, response.text
        assert response.json()["error"]["code"] == "invalid_prompt"


@pytest.mark.parametrize(
    "body, headers, status, code",
    [
        ('{"image": "aGk=", "text": "cat", "colour": "red"}', {}, 400, "invalid_request"),
        ('{"image": "aGk=", "text": ', {}, 400, "invalid_request"),
        ("image=abc&text=cat", {"Content-Type": "application/x-www-form-urlencoded"}, 415, "unsupported_media_type"),
        ("x" * (MAX_BODY_BYTES + 10), {}, 413, "request_too_large"),
    ],
    ids=["unknown_field", "broken_json", "form_content_type", "body_over_limit"],
)
def test_malformed_bodies(http, body, headers, status, code):
    response = http.post("/v1/segment", content=body, headers={"Content-Type": "application/json", **headers})
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


def test_wrong_api_version_and_route(http):
    for path in ("/v2/segment", "/segment", "/v1/segmentation"):
        response = http.post(path, json={"image": image_b64(), "text": "cat"})
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"


def test_api_key(app_url):
    body = {"image": image_b64(), "text": "cat"}
    assert httpx.post(f"{app_url}/v1/segment", json=body, timeout=60).status_code == 401
    wrong = httpx.post(f"{app_url}/v1/segment", json=body, headers={"Authorization": "Bearer nope"}, timeout=60)
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "unauthorized"
    assert wrong.headers["WWW-Authenticate"] == "Bearer"
    assert httpx.get(f"{app_url}/v1/health", timeout=10).status_code == 200, "health stays open"
    info = httpx.get(f"{app_url}/v1/info", timeout=10)
    assert info.status_code == 200 and info.json()["api_key_required"] is True, "info stays open, and says so"
    with Sam3HttpClient(app_url, api_key=API_KEY) as client:
        assert client.run(IMAGE, text="cat").shape == IMAGE.shape[:2]
    from client.errors import AuthenticationError

    with Sam3HttpClient(app_url, api_key="wrong") as client, pytest.raises(AuthenticationError):
        client.run(IMAGE, text="cat")


@pytest.fixture
def slow_batches(app_url, app_config, ray_address):
    """Batches that wait 3 s to fill (a live user_config change), so a queued request can be dropped."""
    config, path = app_config
    pool = deployment(config, "Sam3ModelPool")
    original = dict(pool["user_config"])
    pool["user_config"] = {**original, "batch_wait_timeout_s": 3.0}
    serve_run(config, path, ray_address)
    yield
    pool["user_config"] = original
    serve_run(config, path, ray_address)


def test_work_past_the_deadline_is_dropped(app_url, slow_batches):
    before = model_pool_batch_sizes()
    started = time.monotonic()
    with pytest.raises(RequestTimeoutError):
        Sam3HandleClient(APP_NAME)._segment(SegmentRequest(image=png_bytes(IMAGE), text="cat", timeout_s=0.5), timeout=60)
    assert time.monotonic() - started < 2.5, "the answer comes when the budget runs out, not when the batch runs"
    time.sleep(4)
    assert model_pool_batch_sizes() == before, "the expired request never reached the model"


def test_a_client_that_goes_away_stops_its_work(app_url, slow_batches):
    before = model_pool_batch_sizes()
    with pytest.raises(httpx.TimeoutException):
        httpx.post(
            f"{app_url}/v1/segment",
            json={"image": image_b64(), "text": "cat"},
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=0.5,
        )
    time.sleep(4)
    assert model_pool_batch_sizes() == before, "the disconnected request never reached the model"


def test_errors_are_typed_for_both_clients(app_url):
    """Both clients raise the same class for the same bad input (the errors module is shared)."""
    with Sam3HttpClient(app_url, api_key=API_KEY) as http_client:
        for client in (http_client, Sam3HandleClient(APP_NAME)):
            with pytest.raises(Sam3Error) as raised:
                client.run(png_bytes(random_image(250, 250)), text="cat")
            assert type(raised.value) is ImageTooLargeError
