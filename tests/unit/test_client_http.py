"""Unit tests for client.http_client.Sam3HttpClient against an in-process fake service (httpx.MockTransport)."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Callable

import httpx
import numpy as np
import pytest
from PIL import Image

from client.errors import (
    ERRORS_BY_CODE,
    AuthenticationError,
    ConnectionFailedError,
    InvalidImageError,
    InvalidPromptError,
    InvalidRequestError,
    ModelNotFoundError,
    NotFoundError,
    RequestTimeoutError,
    Sam3Error,
    ServiceUnavailableError,
)
from client.async_http_client import AsyncSam3HttpClient
from client.http_client import Sam3HttpClient
from client.protocol import ErrorDetail, ErrorResponse, HealthResponse, Polygon, SegmentRequest, SegmentResponse
from client.rle import encode_mask
from sam3_serve_core.images import decode_image
from tests.unit.test_client_retry import FakeClock

BASE_URL = "http://sam3.test"
IMAGE_URL = "https://images.test/cat.png"


def masks_and_response(height: int = 4, width: int = 6) -> tuple[list[np.ndarray], SegmentResponse]:
    """Two instances (left and right halves, scores descending) and the response the service sends for them."""
    left = np.zeros((height, width), np.uint8)
    left[:, : width // 2] = 255
    right = np.zeros((height, width), np.uint8)
    right[1:, width // 2 :] = 255
    response = SegmentResponse(
        prompt_type="text",
        height=height,
        width=width,
        union_mask=encode_mask(left | right),
        masks=[encode_mask(left), encode_mask(right)],
        boxes=[(0.0, 0.0, 2.5, 4.0), (3.0, 1.0, 6.0, 4.0)],
        scores=[0.9, 0.6],
    )
    return [left, right], response


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


class FakeService:
    """Serves the segment and health endpoints and one image URL; records every request it gets."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.image = png_bytes(np.full((4, 6, 3), 7, np.uint8))
        self.segment: Callable[[httpx.Request], httpx.Response] = lambda _: httpx.Response(
            200, content=masks_and_response()[1].model_dump_json()
        )

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if str(request.url) == IMAGE_URL:
            return httpx.Response(200, content=self.image)
        if request.url.path.endswith(("/v1/health", "/v1/ready")):
            return httpx.Response(200, content=HealthResponse().model_dump_json())
        return self.segment(request)

    @property
    def api_requests(self) -> list[httpx.Request]:
        return [request for request in self.requests if str(request.url) != IMAGE_URL]

    def sent(self) -> SegmentRequest:
        """The one segment request made, decoded as the server decodes it (the image is base64 in JSON)."""
        (request,) = self.api_requests
        return SegmentRequest.model_validate_json(request.content)


@pytest.fixture
def service() -> FakeService:
    return FakeService()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


class BlockingView:
    """`AsyncSam3HttpClient` called from blocking code (an event loop per call), so that the blocking client's
    behaviour tests hold the asyncio client too: the same requests on the wire, answers, errors and retries."""

    def __init__(self, client: AsyncSam3HttpClient) -> None:
        object.__setattr__(self, "client", client)

    def run(self, *args, **kwargs):
        return asyncio.run(self.client.run(*args, **kwargs))

    def run_with_detections(self, *args, **kwargs):
        return asyncio.run(self.client.run_with_detections(*args, **kwargs))

    def run_many(self, *args, **kwargs) -> list:
        return asyncio.run(_collect(lambda: self.client.run_many(*args, **kwargs)))

    def run_many_with_detections(self, *args, **kwargs) -> list:
        return asyncio.run(_collect(lambda: self.client.run_many_with_detections(*args, **kwargs)))

    def health(self) -> bool:
        return asyncio.run(self.client.health())

    def ready(self) -> bool:
        return asyncio.run(self.client.ready())

    def close(self) -> None:
        asyncio.run(self.client.aclose())

    def __enter__(self) -> BlockingView:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __getattr__(self, name: str):
        return getattr(self.client, name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self.client, name, value)


async def _collect(make_iterator) -> list:
    """The async iterator's items; made inside the loop, so a bad prompt raises from here as the blocking call's does."""
    return [item async for item in make_iterator()]


def fake_client(service: FakeService, clock: FakeClock, kind: str = "blocking", **kwargs) -> Sam3HttpClient:
    """A client of the fake service whose retries wait on the fake clock: the blocking one, or the asyncio one
    seen through `BlockingView`."""
    if kind == "blocking":
        client = Sam3HttpClient(BASE_URL, transport=httpx.MockTransport(service), **kwargs)
        client._sleep, client._clock = clock.sleep, clock.clock
        return client
    client = AsyncSam3HttpClient(BASE_URL, transport=httpx.MockTransport(service), **kwargs)

    async def sleep(seconds: float) -> None:
        clock.sleep(seconds)

    client._sleep, client._clock = sleep, clock.clock
    return BlockingView(client)


@pytest.fixture(params=["blocking", "asyncio"])
def client(request, service: FakeService, clock: FakeClock) -> Sam3HttpClient:
    with fake_client(service, clock, request.param) as client:
        yield client


@pytest.fixture
def image_file(tmp_path: Path) -> Path:
    path = tmp_path / "image.png"
    path.write_bytes(png_bytes(np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)))
    return path


# The request on the wire


def test_run_posts_json_with_the_file_bytes_as_they_are(client, service, image_file):
    client.run(image_file, "cat")
    (request,) = service.api_requests
    assert request.method == "POST"
    assert str(request.url) == f"{BASE_URL}/v1/segment"
    assert request.headers["content-type"] == "application/json"
    assert service.sent() == SegmentRequest(
        image=image_file.read_bytes(), text="cat", return_detections=False, timeout_s=60.0
    )


def test_a_str_path_and_bytes_are_sent_as_they_are(client, service, image_file):
    client.run(str(image_file), text="cat")
    client.run(image_file.read_bytes(), text="cat")
    sent = [SegmentRequest.model_validate_json(request.content).image for request in service.api_requests]
    assert sent == [image_file.read_bytes()] * 2


@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 3), (5, 7, 4)])
def test_numpy_images_travel_as_raw_npy_pixels(client, service, shape):
    """Raw pixels with their shape: lossless, and what the server decodes to the same RGB as the array."""
    pixels = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    client.run(pixels, text="cat")
    sent = np.load(io.BytesIO(service.sent().image), allow_pickle=False)
    np.testing.assert_array_equal(sent, pixels)
    np.testing.assert_array_equal(decode_image(service.sent().image), decode_image(pixels))


def test_bool_numpy_images_become_0_and_255(client, service):
    pixels = np.eye(4, dtype=bool)
    client.run(pixels, text="cat")
    np.testing.assert_array_equal(np.load(io.BytesIO(service.sent().image)), pixels * 255)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "CMYK"])
def test_pil_images_travel_as_lossless_png(client, service, mode):
    """Modes PNG cannot store (CMYK) go as RGB."""
    pixels = np.random.default_rng(1).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    client.run(image, text="cat")
    decoded = Image.open(io.BytesIO(service.sent().image))
    assert decoded.format == "PNG"
    expected = image.convert("RGB") if mode == "CMYK" else image
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(expected))


def test_url_images_are_fetched_by_the_client_without_the_api_key(service, image_file):
    with Sam3HttpClient(BASE_URL, api_key="secret", transport=httpx.MockTransport(service)) as client:
        client.run(IMAGE_URL, text="cat")
    image_request, api_request = service.requests
    assert str(image_request.url) == IMAGE_URL
    assert "authorization" not in image_request.headers
    assert api_request.headers["authorization"] == "Bearer secret"
    assert service.sent().image == service.image


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"text_prompt": "dog"}, {"text": "dog"}),
        ({"prompts": [[1, 2]], "labels": [1]}, {"points": [[1.0, 2.0]], "labels": [1]}),
        ({"points": [[1.5, 2]], "labels": [0]}, {"points": [[1.5, 2.0]], "labels": [0]}),
        (
            {"boxes": [[0, 0, 3, 4], [1, 1, 2, 2]], "labels": [1, 0]},
            {"boxes": [[0, 0, 3, 4], [1, 1, 2, 2]], "labels": [1, 0]},
        ),
        (
            {"points": np.array([[1, 2], [3, 4]]), "labels": np.array([1, 0])},
            {"points": [[1.0, 2.0], [3.0, 4.0]], "labels": [1, 0]},
        ),
        ({"boxes": np.array([[0.5, 0, 3, 4]]), "labels": np.array([1])}, {"boxes": [[0.5, 0, 3, 4]], "labels": [1]}),
        ({"text": "cat", "model_id": "sam3"}, {"text": "cat"}),
    ],
)
def test_prompt_arguments_and_aliases(client, service, image_file, kwargs, expected):
    client.run(image_input=image_file, **kwargs)
    sent = service.sent().model_dump()
    for key in ("text", "points", "boxes", "labels"):
        assert sent[key] == expected.get(key)


def test_run_with_detections_asks_for_detections(client, service, image_file):
    client.run_with_detections(image_file, text="cat")
    assert service.sent().return_detections is True


def test_bearer_header_only_with_an_api_key(service, image_file):
    for api_key, expected in [("k3y", "Bearer k3y"), (None, None)]:
        service.requests.clear()
        with Sam3HttpClient(BASE_URL, api_key=api_key, transport=httpx.MockTransport(service)) as client:
            client.run(image_file, text="cat")
        assert service.api_requests[0].headers.get("authorization") == expected


def test_per_call_timeout_overrides_the_default(service, image_file):
    with Sam3HttpClient(BASE_URL, timeout=12.0, transport=httpx.MockTransport(service)) as client:
        client.run(image_file, text="cat")
        client.run_with_detections(image_file, text="cat", timeout=3.5)
    default_call, override_call = service.api_requests
    assert default_call.extensions["timeout"] == dict.fromkeys(("connect", "read", "write", "pool"), 12.0)
    assert override_call.extensions["timeout"] == dict.fromkeys(("connect", "read", "write", "pool"), 3.5)
    assert [SegmentRequest.model_validate_json(call.content).timeout_s for call in service.api_requests] == [12.0, 3.5]


def test_no_timeout_sends_no_budget(service, image_file):
    with Sam3HttpClient(BASE_URL, timeout=None, transport=httpx.MockTransport(service)) as client:
        client.run(image_file, text="cat")
    assert service.sent().timeout_s is None
    assert service.api_requests[0].extensions["timeout"] == dict.fromkeys(("connect", "read", "write", "pool"), None)


@pytest.mark.parametrize("route_prefix", ["/sam3", "sam3/", "/sam3/"])
def test_route_prefix_goes_before_the_api_path(service, image_file, route_prefix):
    with Sam3HttpClient(BASE_URL + "/", route_prefix=route_prefix, transport=httpx.MockTransport(service)) as client:
        client.run(image_file, text="cat")
    assert str(service.api_requests[0].url) == f"{BASE_URL}/sam3/v1/segment"


# Results


def test_run_returns_the_union_mask(client, image_file):
    (left, right), _ = masks_and_response()
    mask = client.run(image_file, text="cat")
    assert mask.dtype == np.uint8 and mask.shape == (4, 6)
    np.testing.assert_array_equal(mask, left | right)


def test_on_response_sees_each_answer_with_its_server_timings(client, service, image_file):
    _, response = masks_and_response()
    timed = response.model_copy(update={"timings_ms": {"model": 12.5, "total": 20.0}})
    service.segment = lambda _: httpx.Response(200, content=timed.model_dump_json())
    seen: list[SegmentResponse] = []
    client.on_response = seen.append
    client.run(image_file, text="cat")
    client.run_with_detections(image_file, text="dog")
    assert [answer.timings_ms for answer in seen] == [{"model": 12.5, "total": 20.0}] * 2


def test_run_with_detections_returns_plain_python_results(client, image_file):
    (left, right), _ = masks_and_response()
    result = client.run_with_detections(image_file, text="cat")
    assert list(result) == ["union_mask", "boxes", "scores", "masks", "labels"]
    np.testing.assert_array_equal(result["union_mask"], left | right)
    assert result["boxes"] == [[0.0, 0.0, 2.5, 4.0], [3.0, 1.0, 6.0, 4.0]]
    assert all(type(value) is float for box in result["boxes"] for value in box)
    assert result["scores"] == [0.9, 0.6] and all(type(score) is float for score in result["scores"])
    assert [mask.dtype for mask in result["masks"]] == [np.uint8, np.uint8]
    np.testing.assert_array_equal(np.stack(result["masks"]), np.stack([left, right]))


def test_point_prompts_give_empty_detection_lists(client, service, image_file):
    point_mask = np.zeros((4, 6), np.uint8)
    point_mask[1:3, 1:3] = 255
    response = SegmentResponse(prompt_type="points", height=4, width=6, union_mask=encode_mask(point_mask))
    service.segment = lambda _: httpx.Response(200, content=response.model_dump_json())
    result = client.run_with_detections(image_file, points=[[2, 2]], labels=[1])
    np.testing.assert_array_equal(result["union_mask"], point_mask)
    assert (result["masks"], result["boxes"], result["scores"]) == ([], [], [])


# Errors from the service


def error_body(code: str, message: str) -> bytes:
    return ErrorResponse(error=ErrorDetail(code=code, message=message)).model_dump_json().encode()


@pytest.mark.parametrize(("code", "error_type"), sorted(ERRORS_BY_CODE.items()))
def test_json_error_bodies_become_their_typed_error(client, service, image_file, code, error_type):
    service.segment = lambda _: httpx.Response(error_type.http_status or 500, content=error_body(code, "the detail"))
    with pytest.raises(error_type) as raised:
        client.run(image_file, text="cat")
    assert type(raised.value) is error_type
    assert (raised.value.code, raised.value.message) == (code, "the detail")


def test_unknown_error_codes_become_sam3_error_with_the_code(client, service, image_file):
    service.segment = lambda _: httpx.Response(500, content=error_body("brand_new", "something new"))
    with pytest.raises(Sam3Error) as raised:
        client.run(image_file, text="cat")
    assert type(raised.value) is Sam3Error and raised.value.code == "brand_new"


@pytest.mark.parametrize(
    ("status", "error_type"),
    [
        (400, InvalidRequestError),
        (401, AuthenticationError),
        (404, NotFoundError),
        (408, RequestTimeoutError),
        (413, InvalidRequestError),
        (429, ServiceUnavailableError),
        (500, Sam3Error),
        (502, Sam3Error),
        (503, ServiceUnavailableError),
        (504, RequestTimeoutError),
    ],
)
def test_non_json_error_bodies_are_typed_by_status(client, service, image_file, status, error_type):
    service.segment = lambda _: httpx.Response(status, text="<html>proxy says no</html>")
    with pytest.raises(error_type) as raised:
        client.run(image_file, text="cat")
    assert type(raised.value) is error_type
    assert str(status) in raised.value.message and "proxy says no" in raised.value.message


@pytest.mark.parametrize(
    ("transport_error", "error_type"),
    [
        (httpx.ConnectError("connection refused"), ConnectionFailedError),
        (httpx.ReadTimeout("read timed out"), RequestTimeoutError),
        (httpx.ConnectTimeout("connect timed out"), RequestTimeoutError),
        (httpx.RemoteProtocolError("peer closed connection"), ConnectionFailedError),
    ],
)
def test_transport_failures_become_typed_errors(client, service, image_file, transport_error, error_type):
    def fail(_: httpx.Request) -> httpx.Response:
        raise transport_error

    service.segment = fail
    with pytest.raises(error_type) as raised:
        client.run(image_file, text="cat")
    assert BASE_URL in raised.value.message
    assert raised.value.__cause__ is transport_error


def test_a_malformed_success_body_is_a_sam3_error(client, service, image_file):
    service.segment = lambda _: httpx.Response(200, json={"not": "a response"})
    with pytest.raises(Sam3Error, match="malformed response"):
        client.run(image_file, text="cat")


# Retries: only "try again later" answers, within the caller's timeout


def answers(*responses: httpx.Response | Exception) -> Callable[[httpx.Request], httpx.Response]:
    """A segment endpoint that gives these answers in turn, then the normal response."""
    pending = list(responses)

    def answer(request: httpx.Request) -> httpx.Response:
        if not pending:
            return httpx.Response(200, content=masks_and_response()[1].model_dump_json())
        outcome = pending.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return httpx.Response(outcome.status_code, headers=outcome.headers, content=outcome.content)  # unread

    return answer


def budgets(service: FakeService) -> list[tuple[float | None, float | None]]:
    """Each segment request's `timeout_s` and its httpx read timeout."""
    return [
        (SegmentRequest.model_validate_json(request.content).timeout_s, request.extensions["timeout"]["read"])
        for request in service.api_requests
    ]


@pytest.mark.parametrize(
    "failure",
    [
        httpx.Response(503, text="starting"),
        httpx.Response(429, text="slow down"),
        httpx.Response(503, content=error_body("unavailable", "busy")),
        httpx.ConnectError("connection refused"),
        httpx.RemoteProtocolError("peer closed connection"),
    ],
)
def test_unavailable_and_unreachable_are_retried(client, service, clock, image_file, failure):
    service.segment = answers(failure)
    (left, right), _ = masks_and_response()
    np.testing.assert_array_equal(client.run(image_file, text="cat"), left | right)
    assert len(service.api_requests) == 2 and len(clock.sleeps) == 1
    first, second = (SegmentRequest.model_validate_json(request.content) for request in service.api_requests)
    assert second == first.model_copy(update={"timeout_s": 60.0 - clock.sleeps[0]})


def test_retry_after_is_honoured(client, service, clock, image_file):
    service.segment = answers(httpx.Response(503, headers={"retry-after": "3"}, text="starting"))
    client.run(image_file, text="cat")
    assert clock.sleeps == [3.0]


@pytest.mark.parametrize(
    ("retry_after", "low", "high"), [("30", 2.0, 2.0), ("Wed, 21 Oct 2015 07:28:00 GMT", 0, 0.5), ("-1", 0, 0.5)]
)
def test_retry_after_is_capped_and_only_seconds_count(service, clock, image_file, retry_after, low, high):
    service.segment = answers(httpx.Response(503, headers={"retry-after": retry_after}, text="starting"))
    with fake_client(service, clock, backoff_s=0.5, max_backoff_s=2.0) as client:
        client.run(image_file, text="cat")
    (delay,) = clock.sleeps
    assert low <= delay <= high


def test_retries_exhausted_raise_the_last_typed_error(client, service, clock, image_file):
    service.segment = answers(*[httpx.Response(503, content=error_body("unavailable", f"busy {n}")) for n in range(5)])
    with pytest.raises(ServiceUnavailableError, match="busy 3"):
        client.run(image_file, text="cat")
    assert len(service.api_requests) == 4 and len(clock.sleeps) == 3
    assert all(0 <= delay <= min(4.0, 0.25 * 2**n) for n, delay in enumerate(clock.sleeps))


@pytest.mark.parametrize("status", [400, 401, 404, 408, 413, 422, 500, 502, 504])
def test_other_errors_are_not_retried(client, service, clock, image_file, status):
    service.segment = answers(httpx.Response(status, headers={"retry-after": "1"}, text="no"))
    with pytest.raises(Sam3Error):
        client.run(image_file, text="cat")
    assert len(service.api_requests) == 1 and clock.sleeps == []


def test_a_timeout_is_not_retried(client, service, clock, image_file):
    service.segment = answers(httpx.ReadTimeout("read timed out"))
    with pytest.raises(RequestTimeoutError):
        client.run(image_file, text="cat")
    assert len(service.api_requests) == 1 and clock.sleeps == []


def test_retries_0_sends_once(service, clock, image_file):
    service.segment = answers(httpx.Response(503, text="starting"))
    with fake_client(service, clock, retries=0) as client:
        with pytest.raises(ServiceUnavailableError):
            client.run(image_file, text="cat")
    assert len(service.api_requests) == 1 and clock.sleeps == []


def test_each_attempt_carries_the_time_left(service, clock, image_file, monkeypatch):
    monkeypatch.setattr("random.uniform", lambda low, high: high)

    def slow_unavailable(_: httpx.Request) -> httpx.Response:
        clock.now += 0.25
        return httpx.Response(503, text="starting")

    service.segment = slow_unavailable
    with fake_client(service, clock, timeout=4.0, backoff_s=0.25) as client:
        with pytest.raises(ServiceUnavailableError):
            client.run(image_file, text="cat")
    assert clock.sleeps == [0.25, 0.5, 1.0]
    assert budgets(service) == [(4.0, 4.0), (3.5, 3.5), (2.75, 2.75), (1.5, 1.5)]


def test_no_retry_runs_past_the_timeout(service, clock, image_file):
    def slow_unavailable(_: httpx.Request) -> httpx.Response:
        clock.now += 0.25
        return httpx.Response(503, headers={"retry-after": "0.25"}, text=f"starting at {clock.now}")

    service.segment = slow_unavailable
    with fake_client(service, clock, timeout=1.0, backoff_s=0.125) as client:
        # 0.25 s attempt, 0.25 s wait, 0.25 s attempt; one more wait would end at the deadline
        with pytest.raises(ServiceUnavailableError, match="starting at 0.75"):
            client.run(image_file, text="cat")
    assert clock.sleeps == [0.25]
    assert budgets(service) == [(1.0, 1.0), (0.5, 0.5)]


def test_health_and_readiness(client, service):
    assert client.health() is True
    assert str(service.requests[-1].url) == f"{BASE_URL}/v1/health"
    assert client.ready() is True
    assert str(service.requests[-1].url) == f"{BASE_URL}/v1/ready"


def starting(_: httpx.Request) -> httpx.Response:
    return httpx.Response(503, text="starting")


def refuse(_: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused")


@pytest.mark.parametrize("answer", [starting, refuse])
def test_health_and_readiness_are_false_when_the_service_does_not_answer_ok(answer):
    with Sam3HttpClient(BASE_URL, transport=httpx.MockTransport(answer)) as client:
        assert client.health() is False and client.ready() is False


def test_the_context_manager_closes_the_connection_pool(service):
    with Sam3HttpClient(BASE_URL, transport=httpx.MockTransport(service)) as client:
        pass
    assert client._http.is_closed


# Bad images and arguments: refused before anything is sent


def test_url_fetch_failures_name_the_url_and_status():
    with Sam3HttpClient(BASE_URL, transport=httpx.MockTransport(lambda _: httpx.Response(404))) as client:
        with pytest.raises(InvalidImageError, match=r"https://images\.test/cat\.png.*HTTP 404"):
            client.run(IMAGE_URL, text="cat")


def test_unreachable_image_urls_are_invalid_images():
    with Sam3HttpClient(BASE_URL, transport=httpx.MockTransport(refuse)) as client:
        with pytest.raises(InvalidImageError, match="images.test"):
            client.run(IMAGE_URL, text="cat")


@pytest.mark.parametrize(
    ("image_input", "message"),
    [
        (np.zeros((4, 6, 3), np.float32), "dtype uint8"),
        (np.zeros((4, 6, 2), np.uint8), "shape"),
        (np.zeros((4,), np.uint8), "shape"),
        (np.zeros((0, 6), np.uint8), "empty"),
        (None, "required"),
        (42, "unsupported image_input type int"),
        (Path("/nonexistent/cat.jpg"), "cat.jpg"),
        ("/nonexistent/cat.jpg", "cat.jpg"),
    ],
)
def test_bad_images_are_refused(client, service, image_input, message):
    with pytest.raises(InvalidImageError, match=message):
        client.run(image_input, text="cat")
    assert service.requests == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one prompt type.*none"),
        ({"text": "cat", "points": [[1, 2]], "labels": [1]}, "exactly one prompt type.*text, points"),
        ({"points": [[1, 2]], "boxes": [[0, 0, 1, 1]], "labels": [1]}, "exactly one prompt type"),
        ({"text": "cat", "text_prompt": "dog"}, "text or its alias text_prompt"),
        ({"points": [[1, 2]], "prompts": [[1, 2]], "labels": [1]}, "points or its alias prompts"),
        ({"points": [[1, 2]]}, "labels are required with points"),
        ({"boxes": [[0, 0, 1, 1]]}, "labels are required with boxes"),
        ({"points": [[1, 2], [3, 4]], "labels": [1]}, "one entry per point"),
        ({"boxes": [[0, 0, 1, 1]], "labels": [1, 1]}, "one entry per box"),
        ({"points": [[1, 2]], "labels": [2]}, "0 \\(background\\) or 1"),
        ({"boxes": [[0, 0, 1, 1]], "labels": np.array([-1])}, "0 \\(background\\) or 1"),
        ({"text": "cat", "labels": [1]}, "labels go with points or boxes"),
        ({"text": "  "}, "non-empty string"),
        ({"points": [], "labels": []}, "non-empty list"),
        ({"points": [[1, 2, 3]], "labels": [1]}, r"each point must be \[x, y\]"),
        ({"boxes": [[0, 0, 1]], "labels": [1]}, r"each box must be \[x0, y0, x1, y1\]"),
        ({"points": [["a", 2]], "labels": [1]}, "invalid prompt: points.0.0"),
        ({"text": ["cat", ""]}, "non-empty string"),
        ({"text": []}, "non-empty string or a non-empty list"),
        ({"text": "cat", "score_threshold": 1.5}, "invalid prompt: score_threshold"),
        ({"text": "cat", "max_instances": 0}, "invalid prompt: max_instances: .*greater than or equal to 1"),
        ({"text": "cat", "max_instances": -1}, "invalid prompt: max_instances: .*greater than or equal to 1"),
        ({"text": "cat", "max_instances": 2.5}, "invalid prompt: max_instances: .*valid integer"),
        ({"box_sets": [([[0, 0, 1, 1]], [1, 1])]}, "one entry per box"),
        ({"box_sets": [([[0, 0, 1, 1]], [1])], "labels": [1]}, "not with box_sets \\(each box set carries its own"),
        ({"box_sets": [([[0, 0, 1, 1]], [1])], "text": "cat"}, "exactly one prompt type"),
        ({"box_sets": [[[0, 0, 1, 1]]]}, "each box set must be"),
    ],
)
def test_bad_prompts_are_refused(client, service, image_file, kwargs, message):
    with pytest.raises(InvalidPromptError, match=message):
        client.run(image_file, **kwargs)
    assert service.requests == []


@pytest.mark.parametrize("timeout", [0, -1.0, float("nan")])
def test_non_positive_timeouts_are_refused(client, service, image_file, timeout):
    with pytest.raises(InvalidRequestError, match="timeout must be a positive number"):
        client.run(image_file, text="cat", timeout=timeout)
    assert service.requests == []


@pytest.mark.parametrize("model_id", ["", "m" * 129, 3])
def test_malformed_model_ids_are_refused_before_sending(client, service, image_file, model_id):
    with pytest.raises(InvalidRequestError, match="invalid model_id"):
        client.run_with_detections(image_file, text="cat", model_id=model_id)
    assert service.requests == []


def test_prompts_are_checked_before_a_url_is_fetched(client, service):
    with pytest.raises(InvalidPromptError):
        client.run(IMAGE_URL, text="cat", boxes=[[0, 0, 1, 1]], labels=[1])
    assert service.requests == []


def test_several_texts_box_sets_and_a_threshold_travel_as_given(client, service, image_file):
    client.run(image_file, text=["cat", "dog"], score_threshold=0.3)
    sent = SegmentRequest.model_validate_json(service.api_requests[-1].content)
    assert sent.text == ["cat", "dog"] and sent.score_threshold == 0.3
    client.run(image_file, box_sets=[([[0, 0, 3, 4]], [1]), {"boxes": np.array([[1, 1, 2, 2]]), "labels": [0]}])
    sent = SegmentRequest.model_validate_json(service.api_requests[-1].content)
    assert [(box_set.boxes, box_set.labels) for box_set in sent.box_sets] == [
        ([[0, 0, 3, 4]], [1]),
        ([[1, 1, 2, 2]], [0]),
    ]


@pytest.mark.parametrize("method", ["run", "run_with_detections"])
def test_max_instances_goes_on_the_wire_and_none_sends_null(client, service, image_file, method):
    getattr(client, method)(image_file, text="cat", max_instances=2)
    getattr(client, method)(image_file, text="cat")
    limited, unlimited = (json.loads(request.content) for request in service.api_requests)
    assert limited["max_instances"] == 2
    assert unlimited["max_instances"] is None, "the service's default: every instance above the threshold"


def test_run_many_sends_max_instances_with_every_image(client, service, image_file):
    images = [image_file, np.zeros((4, 6, 3), np.uint8)]
    client.run_many_with_detections(images, text="cat", max_instances=3, concurrency=1)
    client.run_many([image_file], text="cat", max_instances=1)
    sent = [SegmentRequest.model_validate_json(request.content) for request in service.api_requests]
    assert [request.max_instances for request in sent] == [3, 3, 1]


@pytest.mark.parametrize("method", ["run_many", "run_many_with_detections"])
def test_run_many_refuses_a_bad_max_instances_before_reading_an_image(client, service, method):
    with pytest.raises(InvalidPromptError, match="max_instances"):
        getattr(client, method)(["missing.png"], text="cat", max_instances=0)
    assert service.requests == []


# Request ids and model ids


def test_each_attempt_sends_its_own_request_id_and_the_error_carries_the_one_answered(client, service, clock, image_file):
    service.segment = lambda request: httpx.Response(
        503, content=error_body("unavailable", "busy"), headers={"x-request-id": request.headers["x-request-id"]}
    )
    with pytest.raises(ServiceUnavailableError) as raised:
        client.run(image_file, text="cat")
    sent = [request.headers["x-request-id"] for request in service.api_requests]
    assert len(sent) == 4 and len(set(sent)) == 4, "one id per attempt (1 call + 3 retries)"
    assert raised.value.request_id == sent[-1]
    assert sent[-1] in str(raised.value), "the message names the id, so a user can quote it"


def test_an_id_a_proxy_replaced_is_the_one_reported(client, service, image_file):
    service.segment = lambda _: httpx.Response(400, content=error_body("invalid_image", "bad"), headers={"x-request-id": "proxy-42"})
    with pytest.raises(InvalidImageError) as raised:
        client.run(image_file, text="cat")
    assert raised.value.request_id == "proxy-42"


def test_a_transport_failure_carries_the_id_that_was_sent(client, service, image_file):
    def fail(_: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("read timed out")

    service.segment = fail
    with pytest.raises(RequestTimeoutError) as raised:
        client.run(image_file, text="cat")
    assert raised.value.request_id == service.api_requests[-1].headers["x-request-id"]


def test_the_model_id_travels_and_an_unknown_one_is_a_typed_404(client, service, image_file):
    service.segment = lambda _: httpx.Response(404, content=error_body("model_not_found", "no model 'sam2'"))
    with pytest.raises(ModelNotFoundError) as raised:
        client.run(image_file, text="cat", model_id="sam2")
    assert isinstance(raised.value, NotFoundError) and raised.value.http_status == 404
    assert service.sent().model_id == "sam2"
    assert len(service.api_requests) == 1, "a 404 is not retried"


def test_polygons_are_asked_for_and_come_back_as_plain_lists(client, service, image_file):
    _, response = masks_and_response()
    square = Polygon(exterior=[(0, 0), (2, 0), (2, 3), (0, 3)], holes=[[(1, 1), (1, 2), (0, 2)]])
    answer = response.model_copy(update={"polygons": [[square], []], "union_polygons": [square]})
    service.segment = lambda _: httpx.Response(200, content=answer.model_dump_json())
    result = client.run_with_detections(image_file, text="cat", polygons=True, polygon_tolerance=2.5)
    sent = service.sent()
    assert (sent.polygons, sent.polygon_tolerance, sent.outline_tolerance) == (True, 2.5, 2.5)
    plain = {"exterior": [[0, 0], [2, 0], [2, 3], [0, 3]], "holes": [[[1, 1], [1, 2], [0, 2]]]}
    assert result["polygons"] == [[plain], []] and result["union_polygons"] == [plain]


def test_without_polygons_nothing_is_outlined(client, service, image_file):
    result = client.run_with_detections(image_file, text="cat")
    assert service.sent().outline_tolerance is None and "polygons" not in result and "union_polygons" not in result


def test_polygons_are_refused_by_run_before_anything_is_sent(client, service, image_file):
    with pytest.raises(InvalidRequestError, match="run_with_detections"):
        client.run(image_file, text="cat", polygons=True)
    assert service.requests == []
