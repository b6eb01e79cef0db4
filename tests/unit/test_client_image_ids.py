"""Unit tests for sending a known image as its `image_id` (client.image_ids and `SegmentClient`), no Ray, no server.

The fake services answer each image with an id derived from its bytes, as the real one derives it from its
pixels, and refuse ids they were told to forget with 404 `image_not_cached`.
"""

from __future__ import annotations

import hashlib
import pickle
import threading

import httpx
import numpy as np
import pytest

from client.errors import ImageNotCachedError, InvalidImageError, RequestTimeoutError, Sam3Error
from client.handle_client import Sam3HandleClient
from client.image_ids import ImageIds, image_key
from client.protocol import SegmentRequest, SegmentResponse
from tests.unit.test_client_handle import RESPONSE, FakeHandle
from tests.unit.test_client_handle import fake_client as fake_handle_client
from tests.unit.test_client_http import FakeService, error_body, masks_and_response, png_bytes
from tests.unit.test_client_http import fake_client as fake_http_client
from tests.unit.test_client_retry import FakeClock

RED = png_bytes(np.full((4, 6, 3), (255, 0, 0), np.uint8))
BLUE = png_bytes(np.full((4, 6, 3), (0, 0, 255), np.uint8))


def id_of(image: bytes) -> str:
    return f"{hashlib.blake2b(image, digest_size=16).hexdigest()}-4x6"


class CachingService(FakeService):
    """A segment endpoint with a feature cache: every answer names its image; `evicted` ids answer 404."""

    def __init__(self, *, gives_ids: bool = True) -> None:
        super().__init__()
        self.gives_ids = gives_ids
        self.evicted: set[str] = set()
        self.duration_s = 0.0
        self.clock: FakeClock | None = None
        self.segment = self.answer

    def answer(self, request: httpx.Request) -> httpx.Response:
        sent = SegmentRequest.model_validate_json(request.content)
        if self.clock is not None:
            self.clock.now += self.duration_s
        if sent.image_id in self.evicted:
            return httpx.Response(404, content=error_body("image_not_cached", f"{sent.image_id} was evicted"))
        image_id = sent.image_id or id_of(sent.image)
        response = masks_and_response()[1].model_copy(update={"image_id": image_id if self.gives_ids else None})
        return httpx.Response(200, content=response.model_dump_json())

    def sent_requests(self) -> list[SegmentRequest]:
        return [SegmentRequest.model_validate_json(request.content) for request in self.api_requests]

    def shapes(self) -> list[str]:
        """What each segment request carried: "bytes" or "id"."""
        return ["id" if sent.image_id is not None else "bytes" for sent in self.sent_requests()]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def service() -> CachingService:
    return CachingService()


@pytest.fixture(params=["blocking", "asyncio"])
def client(request, service, clock):
    with fake_http_client(service, clock, request.param) as client:
        yield client


# Over HTTP


def test_a_second_call_on_the_same_image_sends_its_id_and_no_bytes(client, service):
    first = client.run(RED, text="cat")
    second = client.run_with_detections(RED, text="dog")
    assert service.shapes() == ["bytes", "id"]
    by_bytes, by_id = service.sent_requests()
    assert by_bytes.image == RED and by_bytes.image_id is None
    assert by_id.image is None and by_id.image_id == id_of(RED) and by_id.text == "dog"
    assert b'"image":null' in service.api_requests[1].content and RED not in service.api_requests[1].content
    np.testing.assert_array_equal(first, second["union_mask"])


def test_an_evicted_image_is_sent_again_once_and_the_caller_gets_the_answer(client, service):
    client.run(RED, text="cat")
    service.evicted.add(id_of(RED))
    result = client.run_with_detections(RED, text="cat")
    (left, right), _ = masks_and_response()
    np.testing.assert_array_equal(result["union_mask"], left | right)
    assert service.shapes() == ["bytes", "id", "bytes"]
    assert service.sent_requests()[2].image == RED
    service.evicted.clear()
    client.run(RED, text="cat")
    assert service.shapes()[-1] == "id", "the resent image's fresh id is remembered"


def test_the_resend_gets_only_the_time_left(service, clock):
    service.clock, service.duration_s = clock, 1.5
    with fake_http_client(service, clock, timeout=10.0) as client:
        client.run(RED, text="cat")
        service.evicted.add(id_of(RED))
        client.run(RED, text="cat")
    assert [sent.timeout_s for sent in service.sent_requests()] == [10.0, 10.0, 8.5]


def test_an_eviction_with_no_time_left_is_a_timeout(service, clock):
    service.clock, service.duration_s = clock, 2.0
    with fake_http_client(service, clock, timeout=2.0) as client:
        client.run(RED, text="cat")
        service.evicted.add(id_of(RED))
        with pytest.raises(RequestTimeoutError, match="no time left") as raised:
            client.run(RED, text="cat")
    assert isinstance(raised.value.__cause__, ImageNotCachedError)
    assert service.shapes() == ["bytes", "id"]


def test_a_different_image_or_model_sends_bytes(client, service):
    client.run(RED, text="cat")
    client.run(BLUE, text="cat")
    client.run(RED, text="cat", model_id="other")
    client.run(RED, text="cat", model_id="other")
    assert service.shapes() == ["bytes", "bytes", "bytes", "id"]
    assert service.sent_requests()[3].model_id == "other"


def test_reuse_images_false_always_sends_bytes(service, clock):
    with fake_http_client(service, clock, reuse_images=False) as client:
        for _ in range(3):
            client.run(RED, text="cat")
    assert service.shapes() == ["bytes"] * 3


def test_an_answer_without_an_id_remembers_nothing(service, clock):
    service.gives_ids = False
    with fake_http_client(service, clock) as client:
        client.run(RED, text="cat")
        client.run(RED, text="cat")
        assert len(client._image_ids) == 0
    assert service.shapes() == ["bytes", "bytes"]


def test_other_errors_on_an_id_request_propagate_and_keep_the_id(client, service):
    client.run(RED, text="cat")
    service.segment = lambda _: httpx.Response(400, content=error_body("invalid_image", "bad"))
    with pytest.raises(InvalidImageError):
        client.run(RED, text="cat")
    service.segment = service.answer
    client.run(RED, text="cat")
    assert service.shapes() == ["bytes", "id", "id"]


def test_an_id_request_is_retried_as_an_id(client, service, clock):
    client.run(RED, text="cat")
    unavailable = [httpx.Response(503, text="starting")]
    service.segment = lambda request: unavailable.pop() if unavailable else service.answer(request)
    client.run(RED, text="cat")
    assert service.shapes() == ["bytes", "id", "id"] and len(clock.sleeps) == 1


def test_run_many_sends_a_repeated_image_once(client, service):
    results = client.run_many([RED, RED, BLUE, RED], text="cat", concurrency=1)
    assert not any(isinstance(result, Sam3Error) for result in results)
    assert service.shapes() == ["bytes", "id", "bytes", "id"]


def test_segment_many_sends_a_callers_image_id_as_it_is(service, clock):
    """`segment_many` (rows that each have their own prompt, for Ray jobs) is the blocking clients'."""
    service.evicted.add(id_of(BLUE))
    requests = [SegmentRequest(image_id=id_of(RED), text="cat"), SegmentRequest(image_id=id_of(BLUE), text="cat")]
    with fake_http_client(service, clock) as client:
        found, evicted = client.segment_many(requests)
    assert isinstance(found, SegmentResponse) and found.image_id == id_of(RED)
    assert isinstance(evicted, ImageNotCachedError), "the caller holds no bytes to resend"
    # segment_many sends concurrently: each request goes once, as it is, in no guaranteed order.
    expected = [request.model_copy(update={"timeout_s": 60.0}) for request in requests]
    assert sorted(service.sent_requests(), key=lambda r: r.image_id) == sorted(expected, key=lambda r: r.image_id)


# Over a Serve handle


def test_the_handle_client_sends_a_known_image_as_its_id_and_resends_an_evicted_one(monkeypatch, clock):
    handle = FakeHandle()
    handle.outcome = RESPONSE.model_copy(update={"image_id": id_of(RED)})
    monkeypatch.setattr("client.handle_client._get_app_handle", lambda app_name: handle)
    client = fake_handle_client(clock)
    client.run(RED, text="cat")
    client.run(RED, text="cat")
    handle.failures = [ImageNotCachedError("evicted")]
    client.run(RED, text="cat")
    assert [(request.image, request.image_id) for request in handle.requests] == [
        (RED, None),
        (None, id_of(RED)),
        (None, id_of(RED)),
        (RED, None),
    ]


def test_a_pickled_handle_client_starts_with_no_ids():
    client = Sam3HandleClient("sam3")
    client._image_ids.put(("sam3", b"key"), id_of(RED))
    copy = pickle.loads(pickle.dumps(client))
    assert len(copy._image_ids) == 0 and copy._image_ids.capacity == client._image_ids.capacity
    assert pickle.loads(pickle.dumps(Sam3HandleClient("sam3", reuse_images=False)))._image_ids is None


# The id store


def test_the_least_recently_used_id_is_evicted():
    ids = ImageIds(capacity=2)
    ids.put(("m", b"a"), "id-a")
    ids.put(("m", b"b"), "id-b")
    assert ids.get(("m", b"a")) == "id-a"
    ids.put(("m", b"c"), "id-c")
    assert (ids.get(("m", b"a")), ids.get(("m", b"b")), ids.get(("m", b"c"))) == ("id-a", None, "id-c")
    ids.forget(("m", b"a"))
    assert ids.get(("m", b"a")) is None and len(ids) == 1


def test_the_key_is_the_model_and_the_exact_bytes():
    request = SegmentRequest(image=RED, text="cat", model_id="sam3")
    assert image_key(request) == image_key(request.model_copy(update={"text": "dog", "timeout_s": 1.0}))
    assert image_key(request) != image_key(request.model_copy(update={"model_id": None}))
    assert image_key(request) != image_key(request.model_copy(update={"image": RED + b"\0"}))


def test_the_id_store_stays_bounded_under_threads():
    ids = ImageIds(capacity=8)

    def work(thread: int) -> None:
        for n in range(200):
            ids.put(("m", bytes([thread, n])), f"{thread}-{n}")
            ids.get(("m", bytes([thread, n // 2])))

    threads = [threading.Thread(target=work, args=(thread,)) for thread in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(ids) == 8


def test_capacity_must_be_positive():
    with pytest.raises(ValueError, match="capacity"):
        ImageIds(capacity=0)
