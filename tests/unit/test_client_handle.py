"""Unit tests for client.handle_client.Sam3HandleClient with a fake Serve handle (no Ray cluster is started)."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    RayServeException,
    ReplicaUnavailableError,
)

from client import handle_client
from client.errors import (
    InvalidImageError,
    InvalidPromptError,
    InvalidRequestError,
    NotFoundError,
    PromptTooLongError,
    RequestTimeoutError,
    Sam3Error,
    ServiceUnavailableError,
    error_from_code,
)
from client.handle_client import Sam3HandleClient
from client.protocol import SegmentRequest, SegmentResponse
from client.rle import encode_mask
from deployments.errors import as_sam3_error as server_error
from tests.unit.test_client_retry import FakeClock

MASK = np.triu(np.full((3, 5), 255, np.uint8))
RESPONSE = SegmentResponse(
    prompt_type="boxes",
    height=3,
    width=5,
    union_mask=encode_mask(MASK),
    masks=[encode_mask(MASK)],
    boxes=[(0.0, 0.0, 5.0, 3.0)],
    scores=[0.75],
)


class FakeHandle:
    """Stands in for the ingress `DeploymentHandle`: `handle.segment.remote(request).result(timeout_s=...)`.

    The ingress returns a request's typed error (`returned`); Ray and Serve raise theirs (`failures`, `outcome`).
    """

    def __init__(self) -> None:
        self.requests: list[SegmentRequest] = []
        self.timeouts: list[float | None] = []
        self.failures: list[BaseException] = []  # raised by the first calls, in turn
        self.returned: list[Sam3Error] = []  # then returned by the next calls, in turn, as the ingress does
        self.outcome: Any = RESPONSE  # what `.result()` returns then, or raises if it is an exception
        self.segment = self

    def remote(self, request: SegmentRequest) -> FakeHandle:
        self.requests.append(request)
        return self

    @property
    def request_id(self) -> str:
        """Serve's id of the latest call (`DeploymentResponse.request_id`)."""
        return f"call-{len(self.requests)}"

    def result(self, *, timeout_s: float | None) -> SegmentResponse:
        self.timeouts.append(timeout_s)
        if self.failures:
            raise self.failures.pop(0)
        if self.returned:
            return self.returned.pop(0)
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


@pytest.fixture
def handle() -> FakeHandle:
    return FakeHandle()


@pytest.fixture
def lookups(monkeypatch, handle) -> list[str]:
    """The app names looked up; every lookup answers the fake handle."""
    names: list[str] = []

    def get_app_handle(app_name: str) -> FakeHandle:
        names.append(app_name)
        return handle

    monkeypatch.setattr(handle_client, "_get_app_handle", get_app_handle)
    return names


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def fake_client(clock: FakeClock, app_name: str = "my-sam3", **kwargs) -> Sam3HandleClient:
    """A client whose retries wait on the fake clock."""
    client = Sam3HandleClient(app_name, **kwargs)
    client._sleep, client._clock = clock.sleep, clock.clock
    return client


@pytest.fixture
def client(lookups, clock) -> Sam3HandleClient:
    return fake_client(clock)


IMAGE = np.zeros((3, 5, 3), np.uint8)


def test_importing_client_imports_no_ray_or_torch():
    code = (
        "import sys, client; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'torch', 'transformers'}))"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


def test_the_request_object_travels_as_it_is(client, handle, lookups):
    mask = client.run(IMAGE, boxes=np.array([[0, 0, 5, 3]]), labels=[1])
    (request,) = handle.requests
    assert isinstance(request, SegmentRequest)
    assert (request.boxes, request.labels, request.return_detections) == ([[0.0, 0.0, 5.0, 3.0]], [1], False)
    np.testing.assert_array_equal(mask, MASK)
    assert lookups == ["my-sam3"]


def test_run_with_detections(client, handle):
    result = client.run_with_detections(image_input=IMAGE, text_prompt="cat", model_id="sam3")
    assert handle.requests[0].text == "cat" and handle.requests[0].return_detections is True
    assert list(result) == ["union_mask", "boxes", "scores", "masks", "labels"]
    assert result["boxes"] == [[0.0, 0.0, 5.0, 3.0]] and result["scores"] == [0.75]
    np.testing.assert_array_equal(result["masks"][0], MASK)


def test_max_instances_travels_in_the_request_object(client, handle):
    client.run_with_detections(IMAGE, text="cat", max_instances=2)
    client.run(IMAGE, text="cat", max_instances=1)
    client.run(IMAGE, text="cat")
    assert [request.max_instances for request in handle.requests] == [2, 1, None]


def test_the_handle_is_looked_up_once_and_lazily(lookups):
    client = Sam3HandleClient()
    assert lookups == []
    client.run(IMAGE, text="cat")
    client.run(IMAGE, text="dog")
    assert lookups == ["sam3"]


def test_per_call_timeout_overrides_the_default(lookups, handle):
    client = Sam3HandleClient(timeout=30.0)
    client.run(IMAGE, text="cat")
    client.run(IMAGE, text="cat", timeout=2.0)
    assert handle.timeouts == [30.0, 2.0]
    assert [request.timeout_s for request in handle.requests] == [30.0, 2.0]


@pytest.mark.parametrize(
    ("kwargs", "error_type"),
    [
        ({"text": "cat", "boxes": [[0, 0, 1, 1]], "labels": [1]}, InvalidPromptError),
        ({"points": [[1, 2]], "prompts": [[1, 2]], "labels": [1]}, InvalidPromptError),
        ({"points": [[1, 2]], "labels": [1, 0]}, InvalidPromptError),
        ({"text": "cat", "model_id": ""}, InvalidRequestError),
        ({"text": "cat", "max_instances": 0}, InvalidPromptError),
        ({"text": "cat", "max_instances": -1}, InvalidPromptError),
        ({"image_input": np.zeros((3, 5), np.int16), "text": "cat"}, InvalidImageError),
    ],
)
def test_bad_arguments_are_refused_before_any_call(lookups, handle, kwargs, error_type):
    with pytest.raises(error_type):
        Sam3HandleClient().run(**{"image_input": IMAGE, **kwargs})
    assert (lookups, handle.requests) == ([], [])


def test_a_ray_task_error_is_mapped_back_to_the_replicas_error(client, handle):
    wrapped = RayTaskError(function_name="segment", traceback_str="", cause=InvalidPromptError("bad"))
    handle.outcome = wrapped.as_instanceof_cause()
    assert isinstance(handle.outcome, InvalidPromptError)  # Ray's wrapper subclasses the cause's class
    with pytest.raises(InvalidPromptError) as raised:
        client.run(IMAGE, text="cat")
    assert type(raised.value) is InvalidPromptError
    assert (raised.value.code, raised.value.message) == ("invalid_prompt", "bad")


@pytest.mark.parametrize(
    ("error", "error_type"),
    [
        (PromptTooLongError("too many tokens"), PromptTooLongError),
        (ServiceUnavailableError("busy"), ServiceUnavailableError),
        (BackPressureError(num_queued_requests=10, max_queued_requests=10), ServiceUnavailableError),
        (RayActorError(), ServiceUnavailableError),
        (ActorDiedError(), ServiceUnavailableError),
        (ActorUnavailableError("node lost", None), ServiceUnavailableError),
        (DeploymentUnavailableError("Sam3Model"), ServiceUnavailableError),
        (ReplicaUnavailableError("replica-1"), ServiceUnavailableError),
        (RayTaskError("segment", "", ActorDiedError()), ServiceUnavailableError),
        (GetTimeoutError("timed out"), RequestTimeoutError),
        (TimeoutError("timed out"), RequestTimeoutError),
        (RuntimeError("boom"), Sam3Error),
        (RayTaskError("segment", "", RuntimeError("boom")), Sam3Error),
    ],
)
def test_call_errors_become_typed_errors(client, handle, error, error_type):
    handle.outcome = error
    with pytest.raises(Sam3Error) as raised:
        client.run(IMAGE, text="cat")
    assert type(raised.value) is error_type
    assert raised.value.__cause__ is error


def test_the_server_answers_unavailable_replicas_as_503():
    error = server_error(ReplicaUnavailableError("replica-1"))
    assert type(error) is ServiceUnavailableError and error.http_status == 503
    assert "Replica replica-1 is no longer available" in error.message


@pytest.mark.parametrize(
    "failure",
    [
        BackPressureError(num_queued_requests=10, max_queued_requests=10),
        RayActorError(),
        ActorDiedError(),
        ReplicaUnavailableError("replica-1"),
        ServiceUnavailableError("busy"),
    ],
)
def test_unavailable_replicas_are_retried(client, handle, clock, failure):
    handle.failures = [failure]
    np.testing.assert_array_equal(client.run(IMAGE, text="cat"), MASK)
    assert len(handle.requests) == 2 and len(clock.sleeps) == 1
    assert handle.timeouts == [60.0, 60.0 - clock.sleeps[0]]
    assert [request.timeout_s for request in handle.requests] == handle.timeouts


def test_back_pressure_retry_after_is_honoured(client, handle, clock):
    handle.failures = [BackPressureError(num_queued_requests=10, max_queued_requests=10, retry_after_s=2.5)]
    client.run(IMAGE, text="cat")
    assert clock.sleeps == [2.5]


@pytest.mark.parametrize("failure", [GetTimeoutError("timed out"), InvalidPromptError("bad"), RuntimeError("boom")])
def test_other_errors_are_not_retried(client, handle, clock, failure):
    handle.outcome = failure
    with pytest.raises(Sam3Error):
        client.run(IMAGE, text="cat")
    assert len(handle.requests) == 1 and clock.sleeps == []


def test_retries_run_out_and_can_be_turned_off(lookups, handle, clock):
    handle.outcome = RayActorError()
    for retries in (3, 0):
        handle.requests.clear()
        with pytest.raises(ServiceUnavailableError):
            fake_client(clock, retries=retries).run(IMAGE, text="cat")
        assert len(handle.requests) == retries + 1


def test_unexpected_errors_keep_their_message(client, handle):
    handle.outcome = RuntimeError("boom")
    with pytest.raises(Sam3Error, match="RuntimeError: boom"):
        client.run(IMAGE, text="cat")


def test_unknown_codes_survive_the_round_trip(client, handle):
    handle.outcome = error_from_code("brand_new", "something new")
    with pytest.raises(Sam3Error) as raised:
        client.run(IMAGE, text="cat")
    assert raised.value.code == "brand_new"


@pytest.mark.parametrize(
    ("lookup_error", "error_type"),
    [
        (RayServeException("Application 'my-sam3' does not exist."), NotFoundError),
        (ValueError("no such app"), NotFoundError),
        (ConnectionError("cannot reach the cluster"), Sam3Error),
    ],
)
def test_lookup_failures_become_typed_errors_and_are_retried(monkeypatch, handle, lookup_error, error_type):
    def fail(app_name: str) -> FakeHandle:
        raise lookup_error

    monkeypatch.setattr(handle_client, "_get_app_handle", fail)
    client = Sam3HandleClient("my-sam3")
    with pytest.raises(Sam3Error) as raised:
        client.run(IMAGE, text="cat")
    assert type(raised.value) is error_type
    monkeypatch.setattr(handle_client, "_get_app_handle", lambda app_name: handle)
    client.run(IMAGE, text="cat")
    assert len(handle.requests) == 1


def test_a_failed_call_carries_serves_request_id(client, handle):
    handle.outcome = RayTaskError(function_name="segment", traceback_str="", cause=InvalidPromptError("bad"))
    with pytest.raises(InvalidPromptError) as raised:
        client.run(IMAGE, text="cat")
    assert raised.value.request_id == handle.request_id == "call-1"
    assert "call-1" in str(raised.value)


def returned_by_the_ingress(error: Sam3Error, request_id: str | None = "ingress-id") -> Sam3Error:
    """A typed error as the ingress returns it: logged under the request's id, which it carries."""
    error.request_id = request_id
    return error


@pytest.mark.parametrize(
    "error",
    [
        InvalidImageError("cannot decode the image"),
        PromptTooLongError("too many tokens"),
        NotFoundError("no model 'sam2'"),
        error_from_code("brand_new", "something new"),
        Sam3Error("internal error (RuntimeError)"),
    ],
)
def test_a_typed_error_the_ingress_returns_is_raised_as_it_is(client, handle, clock, error):
    """The ingress returns a request's typed error instead of raising it (Serve would log a traceback for a
    raised one); the client raises the same type, code, message and request id, and does not retry a 4xx."""
    handle.returned = [returned_by_the_ingress(error)]
    with pytest.raises(Sam3Error) as raised:
        client.run(IMAGE, text="cat")
    assert type(raised.value) is type(error)
    assert (raised.value.code, raised.value.message) == (error.code, error.message)
    assert raised.value.request_id == "ingress-id"
    assert len(handle.requests) == 1 and clock.sleeps == []


def test_a_returned_503_is_retried_and_an_error_without_an_id_gets_the_calls(client, handle, clock):
    handle.returned = [returned_by_the_ingress(ServiceUnavailableError("busy"))]
    np.testing.assert_array_equal(client.run(IMAGE, text="cat"), MASK)
    assert len(handle.requests) == 2 and len(clock.sleeps) == 1
    handle.returned = [returned_by_the_ingress(InvalidPromptError("bad"), request_id=None)]
    with pytest.raises(InvalidPromptError) as raised:
        client.run(IMAGE, text="cat")
    assert raised.value.request_id == handle.request_id == "call-3"


def test_bulk_calls_give_a_returned_error_in_its_slot(client, handle):
    handle.returned = [returned_by_the_ingress(InvalidImageError("cannot decode the image"))]
    results = client.run_many([IMAGE, IMAGE], text="cat", concurrency=1)
    assert type(results[0]) is InvalidImageError and results[0].request_id == "ingress-id"
    np.testing.assert_array_equal(results[1], MASK)
