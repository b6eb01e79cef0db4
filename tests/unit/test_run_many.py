"""Unit tests for the bulk calls (`segment_many`, `run_many`, `run_many_with_detections`) on a fake client.

The fake decodes each image, answers with a mask of its size (so the order of the answers shows), and
records how many calls were in flight at once. No Ray, no server.
"""

from __future__ import annotations

import io
import pickle
import threading
import time
from typing import Iterator

import numpy as np
import pytest

from client import _api, handle_client, protocol
from client._api import SegmentClient, segment_request
from client.errors import (
    InvalidImageError,
    InvalidPromptError,
    InvalidRequestError,
    Sam3Error,
    ServiceUnavailableError,
)
from client.handle_client import Sam3HandleClient
from client.protocol import SegmentRequest, SegmentResponse
from client.retry import RetryPolicy
from client.rle import encode_mask


def image(height: int) -> np.ndarray:
    """An image whose height identifies it in the answer."""
    return np.full((height, 3, 3), height, np.uint8)


def response_for(height: int, width: int) -> SegmentResponse:
    mask = np.full((height, width), 255, np.uint8)
    return SegmentResponse(
        prompt_type="text",
        height=height,
        width=width,
        union_mask=encode_mask(mask),
        masks=[encode_mask(mask)],
        boxes=[(0.0, 0.0, float(width), float(height))],
        scores=[0.9],
        labels=[0],
    )


class FakeClient(SegmentClient):
    """A `SegmentClient` whose `_segment` decodes the .npy image and answers a full mask of its size.

    `delay_s(height)` is how long a call takes; `failures[height]` are raised by that image's first calls
    in turn; bytes that are not .npy are refused as the server would refuse them.
    """

    def __init__(self, delay_s=lambda height: 0.0, **policy: float) -> None:
        super().__init__(timeout=30.0, retry_policy=RetryPolicy(backoff_s=0.0, **policy))
        self._sleep = lambda seconds: None
        self.delay_s = delay_s
        self.failures: dict[int, list[BaseException]] = {}
        self.calls: list[int] = []  # the heights, as calls start
        self.finished: list[int] = []  # the heights, as calls end
        self.threads: set[str] = set()
        self.timeouts: list[float | None] = []
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()

    def _segment(self, request: SegmentRequest, timeout: float | None) -> SegmentResponse:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.threads.add(threading.current_thread().name)
            self.timeouts.append(timeout)
        try:
            try:
                pixels = np.load(io.BytesIO(request.image), allow_pickle=False)
            except ValueError as error:
                raise InvalidImageError(f"cannot decode the image: {error}") from error
            height, width = pixels.shape[:2]
            with self._lock:
                self.calls.append(height)
                failures = self.failures.get(height)
                failure = failures.pop(0) if failures else None
            time.sleep(self.delay_s(height))
            with self._lock:
                self.finished.append(height)
            if failure is not None:
                raise failure
            return response_for(height, width)
        finally:
            with self._lock:
                self.in_flight -= 1


HEIGHTS = [2, 3, 4, 5, 6, 7]


def test_results_keep_the_input_order_when_later_items_finish_first():
    client = FakeClient(delay_s=lambda height: 0.02 * (10 - height))
    results = client.run_many([image(height) for height in HEIGHTS], text="cat", concurrency=6)
    assert [result.shape for result in results] == [(height, 3) for height in HEIGHTS]
    assert all(result.dtype == np.uint8 and (result == 255).all() for result in results)
    assert client.finished == HEIGHTS[::-1], "the later items finished first"


def test_run_many_with_detections_gives_what_run_with_detections_gives():
    client = FakeClient(delay_s=lambda height: 0.01 * (10 - height))
    results = client.run_many_with_detections([image(height) for height in HEIGHTS], text="cat", concurrency=3)
    for height, result in zip(HEIGHTS, results, strict=True):
        single = client.run_with_detections(image(height), text="cat")
        assert list(result) == list(single) == ["union_mask", "boxes", "scores", "masks", "labels"]
        np.testing.assert_array_equal(result["union_mask"], single["union_mask"])
        assert result["boxes"] == single["boxes"] == [[0.0, 0.0, 3.0, float(height)]]
        assert result["scores"] == single["scores"] and result["labels"] == single["labels"]
        np.testing.assert_array_equal(np.stack(result["masks"]), np.stack(single["masks"]))


def test_per_image_errors_land_in_their_slots(tmp_path):
    client = FakeClient()
    client.failures[4] = [Sam3Error("the model failed")]
    missing = tmp_path / "missing.png"
    images = [image(2), str(missing), image(4), b"not an image", image(6), 42]
    results = client.run_many(images, text="cat", concurrency=2)
    assert results[0].shape == (2, 3) and results[4].shape == (6, 3)
    assert type(results[1]) is InvalidImageError and "missing.png" in str(results[1])
    assert type(results[2]) is Sam3Error and "the model failed" in str(results[2])
    assert type(results[3]) is InvalidImageError and "cannot decode" in str(results[3])
    assert type(results[5]) is InvalidImageError and "unsupported image_input type int" in str(results[5])
    assert all(result.__traceback__ is None for result in results if isinstance(result, Sam3Error))


def test_an_error_that_is_not_a_sam3_error_is_a_bug_and_propagates():
    client = FakeClient()
    client.failures[3] = [KeyError("a bug")]
    with pytest.raises(KeyError, match="a bug"):
        client.run_many([image(2), image(3), image(4)], text="cat")


def pulled_from(items: list, pulled: list) -> Iterator:
    """A generator that records each item as it is taken."""
    for item in items:
        pulled.append(item)
        yield item


@pytest.mark.parametrize(
    "prompt",
    [
        {"text": ""},
        {"text": "cat", "points": [[1, 2]], "labels": [1]},
        {"boxes": [[0, 0, 2, 2]]},
        {"text": "cat", "score_threshold": 1.5},  # refused by the wire model, not the client's own checks
        {"text": "cat", "max_instances": 0},  # the wire model too
        {"text": "cat", "model_id": ""},
        {"text": "cat", "timeout": 0},
    ],
)
@pytest.mark.parametrize("method", ["run_many", "run_many_with_detections"])
def test_a_bad_prompt_raises_before_any_image_is_read_or_sent(method, prompt):
    client, pulled = FakeClient(), []
    with pytest.raises(InvalidRequestError):
        getattr(client, method)(pulled_from([image(2), "missing.png"], pulled), **prompt)
    assert pulled == [] and client.calls == []


@pytest.mark.parametrize("method", ["run", "run_with_detections", "run_many", "run_many_with_detections"])
def test_every_call_takes_the_same_options_and_refuses_a_misspelt_one(method):
    """One `PromptOptions` for the four calls: each option travels, and an unknown keyword is a TypeError
    raised before anything is sent, as Python raises for a misspelt argument."""
    client, sent = FakeClient(), []
    segment = client._segment
    client._segment = lambda request, timeout: sent.append(request) or segment(request, timeout)
    images = [image(2)] if method.startswith("run_many") else image(2)
    answer = getattr(client, method)(images, text_prompt="cat", model_id="sam3", score_threshold=0.3, max_instances=4)
    assert not isinstance(answer[0] if isinstance(answer, list) else answer, Sam3Error)
    assert [(r.text, r.model_id, r.score_threshold, r.max_instances) for r in sent] == [("cat", "sam3", 0.3, 4)]
    with pytest.raises(TypeError, match="max_instance'"):
        getattr(client, method)(images, text="cat", max_instance=3)
    assert len(sent) == 1


def test_the_prompt_is_checked_once_for_all_images(monkeypatch):
    checks = []
    check_prompt = protocol.check_prompt
    monkeypatch.setattr(protocol, "check_prompt", lambda **kwargs: checks.append(1) or check_prompt(**kwargs))
    FakeClient().run_many([image(height) for height in HEIGHTS], boxes=[[0, 0, 2, 2]], labels=[1])
    assert checks == [1]


@pytest.mark.parametrize("concurrency", [0, -1, 1.5, True, "4", None])
def test_a_bad_concurrency_raises_before_anything_is_sent(concurrency):
    client, pulled = FakeClient(), []
    for call in (
        lambda: client.run_many(pulled_from([image(2)], pulled), text="cat", concurrency=concurrency),
        lambda: client.run_many_with_detections(pulled_from([image(2)], pulled), text="cat", concurrency=concurrency),
        lambda: client.segment_many(pulled_from([], pulled), concurrency=concurrency),
    ):
        with pytest.raises(InvalidRequestError, match="concurrency"):
            call()
    assert pulled == [] and client.calls == []


@pytest.mark.parametrize("one_image", ["a.png", b"\x89PNG", np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.uint8)])
def test_one_image_where_a_list_belongs_is_refused(one_image):
    client = FakeClient()
    with pytest.raises(InvalidRequestError, match="iterable of images"):
        client.run_many(one_image, text="cat")
    assert client.calls == []


def test_a_stack_of_images_is_a_list_of_them():
    results = FakeClient().run_many(np.zeros((3, 5, 4, 3), np.uint8), text="cat")
    assert [result.shape for result in results] == [(5, 4)] * 3


@pytest.mark.parametrize("concurrency", [1, 3, 5])
def test_concurrency_bounds_the_calls_in_flight(concurrency):
    client = FakeClient(delay_s=lambda height: 0.03)
    results = client.run_many([image(2 + index % 7) for index in range(15)], text="cat", concurrency=concurrency)
    assert all(isinstance(result, np.ndarray) for result in results)
    assert client.max_in_flight == concurrency
    assert 1 <= len(client.threads) <= concurrency


def test_images_are_encoded_in_the_worker_threads(monkeypatch):
    threads = []
    encode_image = _api.encode_image

    def recording_encode(*args, **kwargs):
        threads.append(threading.current_thread())
        return encode_image(*args, **kwargs)

    monkeypatch.setattr(_api, "encode_image", recording_encode)
    FakeClient().run_many([image(height) for height in HEIGHTS], text="cat", concurrency=3)
    assert len(threads) == len(HEIGHTS) and threading.main_thread() not in threads


def requests_for(heights: list[int], **prompt) -> list[SegmentRequest]:
    return [segment_request(image(height), **(prompt or {"text": "cat"})) for height in heights]


def test_segment_many_reads_a_generator_lazily():
    client, pulled = FakeClient(delay_s=lambda height: 0.001), []
    results = client.segment_many(pulled_from(requests_for([2, 3, 4, 5, 6] * 200), pulled), concurrency=2)
    assert pulled == [], "nothing is read before the first result is asked for"
    first = next(results)
    assert (first.height, first.width) == (2, 3)
    assert len(pulled) <= 3, "no more than `concurrency` in flight, plus the next one"
    for _ in range(10):
        next(results)
    assert len(pulled) <= 11 + 2
    results.close()
    assert len(pulled) <= 13 and client.max_in_flight <= 2


def test_segment_many_yields_responses_in_order_with_errors_in_place():
    client = FakeClient(delay_s=lambda height: 0.01 * (10 - height))
    client.failures[3] = [InvalidPromptError("bad row")]
    requests = requests_for([2], text="cat") + requests_for([3], points=[[1, 1]], labels=[1])
    requests += requests_for([4], boxes=[[0, 0, 2, 2]], labels=[1])
    results = list(client.segment_many(iter(requests), concurrency=3))
    assert isinstance(results[0], SegmentResponse) and results[0].height == 2
    assert type(results[1]) is InvalidPromptError and str(results[1]) == "bad row"
    assert isinstance(results[2], SegmentResponse) and results[2].height == 4


def test_segment_many_uses_each_requests_timeout_or_the_clients():
    client = FakeClient()
    requests = [segment_request(image(2), text="cat", timeout=5.0), segment_request(image(3), text="cat")]
    assert all(isinstance(result, SegmentResponse) for result in client.segment_many(requests, concurrency=1))
    assert client.timeouts[0] <= 5.0 and 5.0 < client.timeouts[1] <= 30.0


def test_retries_apply_per_item():
    client = FakeClient(retries=2)
    client.failures[3] = [ServiceUnavailableError("busy")]
    client.failures[5] = [ServiceUnavailableError("busy")] * 2
    client.failures[7] = [ServiceUnavailableError("busy")] * 3  # one more than the retries allow
    results = client.run_many([image(height) for height in HEIGHTS], text="cat", concurrency=4)
    assert [result.shape for result in results[:-1]] == [(height, 3) for height in HEIGHTS[:-1]]
    assert type(results[-1]) is ServiceUnavailableError
    assert sorted(client.calls) == sorted(HEIGHTS + [3, 5, 5, 7, 7])

    client.failures[4] = [ServiceUnavailableError("busy")]
    assert all(isinstance(result, SegmentResponse) for result in client.segment_many(requests_for([4])))


def test_the_handle_is_looked_up_once_when_threads_race_to_it(monkeypatch):
    """Serve refuses to initialize a handle twice, so concurrent first calls must not each look it up."""
    lookups = []

    class SlowHandle:
        """An app handle whose `segment` method handle (what initializes a Serve handle) counts its creations."""

        def __init__(self) -> None:
            self.segments = 0

        @property
        def segment(self):
            self.segments += 1
            time.sleep(0.05)
            return self

        def remote(self, request: SegmentRequest):
            return self

        def result(self, *, timeout_s: float | None) -> SegmentResponse:
            return response_for(2, 3)

    handle = SlowHandle()

    def get_app_handle(app_name: str) -> SlowHandle:
        lookups.append(app_name)
        time.sleep(0.05)
        return handle

    monkeypatch.setattr(handle_client, "_get_app_handle", get_app_handle)
    client = Sam3HandleClient("racy")
    results = client.run_many([image(2)] * 16, text="cat", concurrency=8)
    assert all(isinstance(result, np.ndarray) for result in results)
    assert lookups == ["racy"] and handle.segments == 1


def test_the_handle_client_still_pickles_for_ray_tasks():
    client = pickle.loads(pickle.dumps(Sam3HandleClient("sam3", timeout=12.0)))
    assert (client.app_name, client.timeout) == ("sam3", 12.0)
