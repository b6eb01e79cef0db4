"""The video API's arguments, wire rules and stream handling, without Ray or a model."""

from __future__ import annotations

import asyncio
import weakref
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

from client import AsyncSam3HttpClient, InvalidVideoError, Sam3HttpClient, masklets
from client._video import frame_result, frames_of, video_prompt
from client.errors import InvalidPromptError, SessionNotFoundError
from client.protocol import ErrorDetail, ErrorResponse
from client.rle import encode_mask
from client.video_protocol import (
    NDJSON,
    VIDEOS_PATH,
    ObjectPrompt,
    TrackedFrame,
    TrackedObject,
    TrackLine,
    TrackRequest,
    VideoPromptRequest,
    VideoPromptResponse,
    VideoSessionInfo,
    video_session_path,
)
from deployments.config import AppArgs
from deployments.model_pool import LoadedModel, Sam3ModelPool
from deployments.video_replica import HeldSession, session_token
from sam3_serve_core import video_tracking
from sam3_serve_core.video_sessions import SessionLimits, VideoSessions
from sam3_serve_core.video_tracking import to_wire


def test_texts_are_one_concept_or_several():
    assert video_prompt(text="cat").texts == ["cat"]
    assert video_prompt(text=("cat", "dog")).texts == ["cat", "dog"]


def test_flat_points_are_one_object_and_nested_points_several():
    one = video_prompt(points=[[1, 2], [3, 4]], labels=[1, 0], frame=3)
    assert one.frame_index == 3 and [(o.object_id, o.points, o.labels) for o in one.objects] == [(1, [[1, 2], [3, 4]], [1, 0])]
    several = video_prompt(points=np.array([[[1, 2]], [[5, 6]]]), labels=[[1], [1]], object_ids=[7, 9])
    assert [(o.object_id, o.points) for o in several.objects] == [(7, [[1, 2]]), (9, [[5, 6]])]


def test_each_box_is_an_object_to_follow():
    boxes = video_prompt(boxes=[[0, 0, 5, 5], [2, 2, 9, 9]])
    assert [(o.object_id, o.box) for o in boxes.objects] == [(1, [0, 0, 5, 5]), (2, [2, 2, 9, 9])]
    assert video_prompt(boxes=[[0, 0, 5, 5]], labels=[1]).objects[0].box == [0, 0, 5, 5]


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({}, "exactly one of text, points or boxes"),
        ({"text": "cat", "boxes": [[0, 0, 1, 1]]}, "exactly one"),
        ({"points": [[1, 2]]}, "need labels"),
        ({"points": [[[1, 2]], [[3, 4]]], "labels": [1, 1]}, "nested like the points"),
        ({"points": [[1, 2]], "labels": [1], "object_ids": [1, 2]}, "1 objects but 2 object_ids"),
        ({"boxes": [[0, 0, 5, 5]], "labels": [0]}, "label must be 1"),
        ({"points": [[1, float("nan")]], "labels": [1]}, "finite"),
        ({"boxes": [[0, 0, 5]]}, "4 numbers"),
        ({"text": ""}, "non-empty"),
    ],
)
def test_bad_prompts_are_refused_before_anything_is_sent(arguments, message):
    with pytest.raises(InvalidPromptError, match=message):
        video_prompt(**arguments)


def test_the_wire_refuses_a_prompt_of_two_kinds_or_a_repeated_object():
    with pytest.raises(InvalidPromptError, match="exactly one of `text` and `objects`"):
        VideoPromptRequest(text="cat", objects=[ObjectPrompt(object_id=1, box=[0, 0, 1, 1])])
    with pytest.raises(InvalidPromptError, match="once per prompt"):
        VideoPromptRequest(objects=[ObjectPrompt(object_id=1, box=[0, 0, 1, 1]), ObjectPrompt(object_id=1, box=[0, 0, 2, 2])])
    with pytest.raises(InvalidPromptError, match="labels go with points"):
        ObjectPrompt(object_id=1, box=[0, 0, 1, 1], labels=[1])


def tracked(frame_index: int, object_ids: list[int]) -> video_tracking.TrackedFrame:
    masks = {object_id: np.zeros((4, 6), bool) for object_id in object_ids}
    for object_id, mask in masks.items():
        mask[object_id % 4, : object_id + 1] = True
    return video_tracking.TrackedFrame(
        frame_index,
        tuple(video_tracking.TrackedObject(object_id, masks[object_id], (0.0, 0.0, 1.0, 1.0), 0.5, "cat") for object_id in object_ids),
    )


def test_a_frame_travels_as_rle_and_comes_back_as_uint8_masks():
    original = tracked(3, [1, 2])
    result = frame_result(to_wire(original))
    assert result["frame_index"] == 3 and result["object_ids"] == [1, 2] and result["prompts"] == ["cat", "cat"]
    for mask, obj in zip(result["masks"], original.objects):
        assert mask.dtype == np.uint8
        np.testing.assert_array_equal(mask, obj.mask.astype(np.uint8) * 255)
    assert frame_result(to_wire(video_tracking.TrackedFrame(4, ()))) == {
        "frame_index": 4, "object_ids": [], "masks": [], "boxes": [], "scores": [], "prompts": []
    }


def test_masklets_collect_each_objects_masks_by_frame_and_a_later_answer_wins():
    frames = [frame_result(to_wire(tracked(index, ids))) for index, ids in [(0, [1, 2]), (1, [2]), (0, [1])]]
    collected = masklets(frames)
    assert sorted(collected) == [1, 2]
    assert sorted(collected[1]) == [0] and sorted(collected[2]) == [0, 1]
    assert collected[1][0] is frames[2]["masks"][0]


def test_a_stream_yields_its_frames_and_raises_the_error_that_stopped_it():
    mask = encode_mask(np.ones((2, 2), np.uint8))
    frame = TrackedFrame(frame_index=0, objects=[TrackedObject(object_id=1, mask=mask, box=(0, 0, 1, 1), score=0.9)])
    lines = [
        TrackLine(type="frame", frame=frame, done=1, total=2),
        TrackLine(type="error", done=1, error=ErrorDetail(code=InvalidVideoError.code, message="broken")),
    ]
    stream = frames_of(lines)
    assert next(stream)["object_ids"] == [1]
    with pytest.raises(InvalidVideoError, match="broken"):
        next(stream)
    assert list(frames_of([TrackLine(type="end", done=0, total=0)])) == []


def test_a_session_id_names_the_replica_that_holds_it():
    token = "0" * 32
    assert session_token(f"abc.{token}", "abc") == token
    with pytest.raises(SessionNotFoundError, match="no longer running"):
        session_token(f"other.{token}", "abc")


SESSION_ID = f"replica1.{'ab' * 16}"


def fake_service(calls: list, fail_track: bool = False) -> httpx.MockTransport:
    """The service's video routes as the clients see them: each request is recorded in `calls`."""
    info = VideoSessionInfo(session_id=SESSION_ID, model_id="sam3", frames=3, width=6, height=4, task=None)
    mask = encode_mask(np.ones((4, 6), np.uint8))
    lines = [
        TrackLine(type="frame", frame=TrackedFrame(frame_index=i, objects=[TrackedObject(object_id=1, mask=mask, box=(0, 0, 5, 3), score=0.9)]), done=i + 1, total=3)
        for i in range(3)
    ] + [TrackLine(type="end", done=3, total=3)]

    def handle(request: httpx.Request) -> httpx.Response:
        calls.append((request.method, request.url.path, request.headers.get("content-type"), request.content))
        path = request.url.path
        if request.method == "POST" and path == VIDEOS_PATH:
            return httpx.Response(201, content=info.model_dump_json())
        if path.endswith("/prompts"):
            return httpx.Response(200, content=VideoPromptResponse(session=info).model_dump_json())
        if path.endswith("/track"):
            if fail_track:
                body = ErrorResponse(error=ErrorDetail(code=SessionNotFoundError.code, message="it was evicted"))
                return httpx.Response(404, content=body.model_dump_json())
            return httpx.Response(200, content="".join(line.model_dump_json() + "\n" for line in lines), headers={"content-type": NDJSON})
        if request.method == "DELETE":
            return httpx.Response(204)
        return httpx.Response(500)

    return httpx.MockTransport(handle)


def test_track_makes_prompts_streams_and_ends_a_session_over_http():
    calls = []
    with Sam3HttpClient(transport=fake_service(calls)) as client:
        frames = list(client.track(b"video bytes", text="cat", model_id="sam3"))
    assert [frame["frame_index"] for frame in frames] == [0, 1, 2]
    assert frames[0]["masks"][0].dtype == np.uint8 and frames[0]["masks"][0].max() == 255
    assert [(method, path) for method, path, _, _ in calls] == [
        ("POST", VIDEOS_PATH),
        ("POST", video_session_path(SESSION_ID, "prompts")),
        ("POST", video_session_path(SESSION_ID, "track")),
        ("DELETE", video_session_path(SESSION_ID)),
    ]
    assert calls[0][2:] == ("application/octet-stream", b"video bytes")
    assert VideoPromptRequest.model_validate_json(calls[1][3]).texts == ["cat"]


def test_a_session_is_ended_when_the_caller_stops_early_or_tracking_fails():
    calls = []
    with Sam3HttpClient(transport=fake_service(calls)) as client:
        frames = client.track(b"video bytes", points=[[1, 2]], labels=[1])
        next(frames)
        frames.close()
    assert calls[-1][0] == "DELETE"
    failing = []
    with Sam3HttpClient(transport=fake_service(failing, fail_track=True)) as client:
        with pytest.raises(SessionNotFoundError, match="evicted"):
            list(client.track(b"video bytes", text="cat"))
    assert failing[-1][0] == "DELETE"


def test_tracking_options_travel_and_a_misspelt_one_is_refused_before_anything_is_sent():
    calls = []
    with Sam3HttpClient(transport=fake_service(calls)) as client:
        frames = list(client.track(b"video bytes", text="cat", start_frame=2, max_frames=5, reverse=True, rle_masks=True))
        with pytest.raises(TypeError, match="'start'"):
            list(client.track(b"video bytes", text="cat", start=2))
    assert TrackRequest.model_validate_json(calls[2][3]) == TrackRequest(start_frame=2, max_frames=5, reverse=True)
    assert set(frames[0]["masks"][0]) == {"size", "counts"}
    assert len(calls) == 4, "the misspelt call sent nothing"

    async def misspelt() -> None:
        async with AsyncSam3HttpClient(transport=fake_service(calls)) as client:
            async for _ in client.track_session(SESSION_ID, max_frame=5):
                pass

    with pytest.raises(TypeError, match="'max_frame'"):
        asyncio.run(misspelt())
    assert len(calls) == 4


def test_the_asyncio_client_tracks_alike():
    calls = []

    async def track() -> list[dict]:
        async with AsyncSam3HttpClient(transport=fake_service(calls)) as client:
            return [frame async for frame in client.track(b"video bytes", boxes=[[0, 0, 3, 3]])]

    frames = asyncio.run(track())
    assert [frame["object_ids"] for frame in frames] == [[1], [1], [1]]
    assert [method for method, *_ in calls] == ["POST", "POST", "POST", "DELETE"]
    assert VideoPromptRequest.model_validate_json(calls[1][3]).objects[0].box == [0, 0, 3, 3]


def test_a_session_ends_with_its_model():
    """Once multiplexing has unloaded a session's model, the session is gone and says why (it would otherwise
    keep the model's weights on the device)."""
    pool = object.__new__(Sam3ModelPool.func_or_class)
    pool._replica_id = "replica1"
    pool._video_sessions = VideoSessions(SessionLimits(max_sessions=4, max_bytes=10**9, idle_timeout_s=60))
    pool._held = weakref.WeakValueDictionary()
    model = LoadedModel("sam3", models=None, runner=None, batcher=None)
    pool._held["sam3"] = model
    token = pool._video_sessions.open(HeldSession("sam3", session=None), 0)
    assert pool._held_session(f"replica1.{token}")[0] == token
    del pool._held["sam3"]
    for _ in range(2):
        with pytest.raises(SessionNotFoundError, match="its model sam3 was unloaded"):
            pool._held_session(f"replica1.{token}")


def test_a_sweep_ends_sessions_of_an_unloaded_model_and_idle_ones_and_reports_what_is_held():
    """With no video request at all: a session whose model was unloaded, and one idle past its timeout, are
    ended by a sweep, each end heard with its reason; what is still held is reported per served model."""
    pool = object.__new__(Sam3ModelPool.func_or_class)
    pool._args = AppArgs(models={"sam3": "a", "small": "b"}, default_model="sam3")
    ended, reported = [], []
    pool.metrics = SimpleNamespace(
        video_sessions_ended=SimpleNamespace(inc=lambda tags: ended.append(tags)),
        observe_video_sessions=lambda model_ids, holdings: reported.append((list(model_ids), holdings)),
    )
    clock = SimpleNamespace(now=0.0)
    pool._video_sessions = VideoSessions(SessionLimits(4, 10**9, 60), clock=lambda: clock.now, on_end=pool._session_ended)
    pool._held = weakref.WeakValueDictionary()
    model = LoadedModel("sam3", models=None, runner=None, batcher=None)
    pool._held["sam3"] = model
    pool._video_sessions.open(HeldSession("sam3", session=None), 100)
    pool._video_sessions.open(HeldSession("small", session=None), 200)  # "small" is not loaded
    pool._sweep_video_sessions_once()
    assert ended == [{"model_id": "small", "reason": "model_unloaded"}]
    assert reported == [(["sam3", "small"], {"sam3": {"sessions": 1, "bytes": 100}})]
    clock.now = 60
    pool._sweep_video_sessions_once()
    assert ended[1:] == [{"model_id": "sam3", "reason": "idle"}] and reported[-1] == (["sam3", "small"], {})
