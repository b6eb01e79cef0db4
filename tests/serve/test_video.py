"""Video sessions through the real application: two model replicas, the HTTP and the handle clients.

On the tiny checkpoint (random weights: its masks are meaningless, only agreement matters), CPU profile. The
service's answers equal an in-process `VideoSession`'s on the same file: the same computation on the same
models, so the same bits.
"""

from __future__ import annotations

import json
import time
from functools import lru_cache

import httpx
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import ray
import yaml
from ray import serve

from client import InvalidVideoError, SessionNotFoundError, VideoTooLongError, masklets
from client.errors import InvalidPromptError, RequestTooLargeError
from client.protocol import RleMask
from client.rle import decode_mask
from client.video_protocol import NDJSON, VIDEOS_PATH, TrackLine, video_session_path
from pipelines.track import TrackJobConfig, run_job
from sam3_serve_core.checkpoint import load_sam3
from sam3_serve_core.video_frames import VideoLimits, video_frames
from sam3_serve_core.video_tracking import ObjectPrompt, VideoSession, load_video_models
from tests.serve.app_runner import (
    APP_NAME,
    cpu_config,
    deployment,
    replica_count,
    replica_stats,
    serve_run,
    wait_until_running,
)
from tests.videos import encode_video, moving_shapes

MODEL_REPLICAS = 2
MAX_FRAMES = 40
IDLE_TIMEOUT_S = 20.0
FRAMES = moving_shapes(8)
VIDEO = encode_video(FRAMES, "matroska", "ffv1")
CLICKS = {"points": [[[20, 15], [5, 60]], [[60, 26], [90, 5]]], "labels": [[1, 0], [1, 0]]}


@pytest.fixture(scope="module")
def app_url(ray_address, serve_port, tiny112_dir, tmp_path_factory):
    config = cpu_config(str(tiny112_dir), serve_port)
    pool = deployment(config, "Sam3ModelPool")
    pool["autoscaling_config"].update(min_replicas=MODEL_REPLICAS, max_replicas=MODEL_REPLICAS)
    config["applications"][0]["args"]["video"] = {
        "max_frames": MAX_FRAMES,
        "max_upload_bytes": 2_000_000,
        "sessions_per_replica": 2,
        "idle_timeout_s": IDLE_TIMEOUT_S,
    }
    yield serve_run(config, tmp_path_factory.mktemp("serve") / "config.yaml", ray_address)
    serve.delete(APP_NAME)


@lru_cache(maxsize=None)
def in_process(checkpoint: str, task: str) -> list[dict]:
    """The same file tracked in this process, as `track()` gives its frames (masks as uint8 0/255)."""
    session = VideoSession(load_video_models(checkpoint, load_sam3(checkpoint)), max_frames=MAX_FRAMES)
    for rgb in video_frames(VIDEO, VideoLimits(MAX_FRAMES, 10**7)):
        session.add_frame(rgb)
    if task == "concepts":
        session.set_texts(["red square", "green disc"])
    else:
        session.add_objects(0, [ObjectPrompt(1, points=[[20, 15], [5, 60]], labels=[1, 0]), ObjectPrompt(2, points=[[60, 26], [90, 5]], labels=[1, 0])])
    _, tracked = session.propagate()
    return [
        {
            "frame_index": frame.frame_index,
            "object_ids": [obj.object_id for obj in frame.objects],
            "masks": [obj.mask.astype(np.uint8) * 255 for obj in frame.objects],
            "boxes": [list(obj.box) for obj in frame.objects],
            "scores": [obj.score for obj in frame.objects],
            "prompts": [obj.prompt for obj in frame.objects],
        }
        for frame in tracked
    ]


def assert_same_frames(ours: list[dict], expected: list[dict]) -> None:
    assert [frame["frame_index"] for frame in ours] == [frame["frame_index"] for frame in expected]
    for actual, wanted in zip(ours, expected):
        assert actual["object_ids"] == wanted["object_ids"]
        for mask, wanted_mask in zip(actual["masks"], wanted["masks"]):
            np.testing.assert_array_equal(mask, wanted_mask)
        np.testing.assert_allclose(actual["boxes"], wanted["boxes"], rtol=0, atol=0)
        np.testing.assert_allclose(np.float32(actual["scores"]), np.float32(wanted["scores"]), rtol=0, atol=0)
        assert actual["prompts"] == wanted["prompts"]


def test_concepts_over_http_equal_the_in_process_session(http_client, tiny112_dir):
    frames = list(http_client.track(VIDEO, text=["red square", "green disc"]))
    assert len(frames) == len(FRAMES) and any(frame["object_ids"] for frame in frames)
    assert all(mask.dtype == np.uint8 and mask.shape == (72, 96) for frame in frames for mask in frame["masks"])
    assert_same_frames(frames, in_process(str(tiny112_dir), "concepts"))


def test_clicked_objects_over_the_handle_equal_the_in_process_session(handle_client, tiny112_dir):
    frames = list(handle_client.track(VIDEO, **CLICKS))
    assert_same_frames(frames, in_process(str(tiny112_dir), "objects"))
    collected = masklets(frames)
    assert sorted(collected) == [1, 2] and all(len(per_frame) == len(FRAMES) for per_frame in collected.values())


def test_the_stream_arrives_line_by_line_with_its_progress(app_url, http_client):
    """Read over plain HTTP, as the network gives it: the first frame's line comes in a read of its own, before
    the end line, which follows 39 more frames of tracking (objects, whose tracker answers each frame as it goes,
    where the concept tracker holds back its first 15). An answer made whole and then sent comes in one read."""
    long_video = encode_video(moving_shapes(MAX_FRAMES), "matroska", "ffv1")
    session = http_client.open_video(long_video)
    assert (session.frames, session.width, session.height, session.task) == (MAX_FRAMES, 96, 72, None)
    http_client.prompt_video(session.session_id, **CLICKS)
    with httpx.Client(base_url=app_url, timeout=60) as http:
        with http.stream("POST", video_session_path(session.session_id, "track")) as response:
            assert response.status_code == 200 and response.headers["content-type"].startswith(NDJSON)
            reads = list(response.iter_raw())
    lines = [TrackLine.model_validate_json(line) for line in b"".join(reads).splitlines()]
    assert [line.type for line in lines] == ["frame"] * MAX_FRAMES + ["end"]
    assert [line.done for line in lines[:-1]] == list(range(1, MAX_FRAMES + 1))
    assert {line.total for line in lines} == {MAX_FRAMES}
    first_line_read = next(index for index, read in enumerate(reads) if b"\n" in read)
    assert first_line_read < len(reads) - 1, f"the first frame's line came with the end line ({len(reads)} reads)"
    http_client.close_video(session.session_id)


def test_a_correction_on_a_later_frame_and_tracking_backward(http_client):
    session = http_client.open_video(VIDEO)
    first = http_client.prompt_video(session.session_id, **CLICKS)
    assert first["frame_index"] == 0 and first["object_ids"] == [1, 2]
    corrected = http_client.prompt_video(session.session_id, points=[[30, 20]], labels=[1], frame=5, object_ids=[2])
    assert corrected["frame_index"] == 5 and 2 in corrected["object_ids"]
    forward = list(http_client.track_session(session.session_id))
    backward = list(http_client.track_session(session.session_id, start_frame=5, reverse=True))
    assert [frame["frame_index"] for frame in forward] == list(range(len(FRAMES)))
    assert [frame["frame_index"] for frame in backward] == [5, 4, 3, 2, 1, 0]
    with pytest.raises(InvalidPromptError, match="tracks objects"):
        http_client.prompt_video(session.session_id, text="cat")
    http_client.close_video(session.session_id)
    with pytest.raises(SessionNotFoundError, match="ended"):
        list(http_client.track_session(session.session_id))


def test_frames_pushed_one_by_one_from_a_live_source(http_client, handle_client):
    for client in (http_client, handle_client):
        session = client.open_video(FRAMES[:2])  # frames before the prompt are stored
        assert session.frames == 2
        client.prompt_video(session.session_id, **CLICKS)
        live = [client.push_frame(session.session_id, rgb) for rgb in FRAMES[2:5]]
        assert [frame["frame_index"] for frame in live] == [2, 3, 4]
        assert all(frame["object_ids"] == [1, 2] for frame in live)
        client.close_video(session.session_id)


def replica_of(session) -> str:
    return session.session_id.split(".")[0]


def test_two_sessions_live_on_two_replicas_at_once(http_client):
    """Sessions open on whichever replica the router picks (opened until each replica holds one: 20 tries
    miss one of two replicas about 4 times in a million); each request of a session reaches its own."""
    by_replica = {}
    for _ in range(20):
        session = http_client.open_video(VIDEO)
        if replica_of(session) in by_replica:
            http_client.close_video(session.session_id)
        else:
            by_replica[replica_of(session)] = session
        if len(by_replica) == MODEL_REPLICAS:
            break
    sessions = list(by_replica.values())
    assert len(sessions) == MODEL_REPLICAS
    for session in sessions:
        http_client.prompt_video(session.session_id, text="red square")
    streams = [http_client.track_session(session.session_id) for session in sessions]
    interleaved = [next(stream)["frame_index"] for _ in range(3) for stream in streams]
    assert interleaved == [0, 0, 1, 1, 2, 2]
    for stream in streams:
        assert len(list(stream)) == len(FRAMES) - 3
    for session in sessions:
        http_client.close_video(session.session_id)


def test_the_least_recently_used_session_is_evicted_and_an_idle_one_ends(http_client):
    """Two sessions a replica: the fifth of five sessions on two replicas evicts some replica's oldest."""
    sessions = [http_client.open_video(VIDEO) for _ in range(2 * MODEL_REPLICAS + 1)]
    gone = []
    for session in sessions:
        try:
            http_client.video_session(session.session_id)
        except SessionNotFoundError as error:
            assert "evicted to make room" in str(error)
            gone.append(session)
    assert gone and sessions[-1] not in gone
    idle = http_client.open_video(VIDEO)
    time.sleep(IDLE_TIMEOUT_S + 1)
    with pytest.raises(SessionNotFoundError, match="idle"):
        http_client.prompt_video(idle.session_id, text="cat")


def test_idle_sessions_end_with_no_video_request_to_notice_them(http_client):
    """Their memory is the device's: each replica sweeps its sessions (here every 5 s, a quarter of the idle
    timeout), and `stats()` shows what it holds."""
    http_client.open_video(VIDEO)
    held = [stats["video_sessions"] for stats in replica_stats(MODEL_REPLICAS).values()]
    assert sum(models["sam3"]["sessions"] for models in held if models) >= 1
    assert all(models["sam3"]["bytes"] > 0 for models in held if models)
    deadline = time.monotonic() + IDLE_TIMEOUT_S + 30
    while any(stats["video_sessions"] for stats in replica_stats(MODEL_REPLICAS).values()):
        assert time.monotonic() < deadline, "an idle session outlived its timeout and the sweep after it"
        time.sleep(1)


def test_a_session_whose_replica_died_is_not_found_at_once(app_url, http_client):
    session = http_client.open_video(VIDEO)
    name = f"SERVE_REPLICA::{APP_NAME}#Sam3ModelPool#{replica_of(session)}"
    (actor,) = [actor for actor in ray.util.list_named_actors(all_namespaces=True) if actor["name"] == name]
    ray.kill(ray.get_actor(name, namespace=actor["namespace"]), no_restart=True)
    started = time.perf_counter()
    with pytest.raises(SessionNotFoundError, match="replica"):
        http_client.prompt_video(session.session_id, text="cat")
    assert time.perf_counter() - started < 30
    deadline = time.monotonic() + 180  # until Serve has replaced the replica
    while name in pool_replicas() or len(pool_replicas()) < MODEL_REPLICAS or replica_count("Sam3ModelPool") < MODEL_REPLICAS:
        assert time.monotonic() < deadline, "the model replica was not replaced"
        time.sleep(1)
    wait_until_running(app_url, timeout_s=180)
    http_client.close_video(http_client.open_video(VIDEO).session_id)


def pool_replicas() -> list[str]:
    prefix = f"SERVE_REPLICA::{APP_NAME}#Sam3ModelPool#"
    return [actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True) if actor["name"].startswith(prefix)]


@pytest.mark.parametrize(
    "data, error, status",
    [
        (b"this is not a video", InvalidVideoError, 400),
        (encode_video(FRAMES)[:984], InvalidVideoError, 400),  # an mp4 cut in half, before its index
        (encode_video(moving_shapes(12), "mpegts", "mpeg4")[: 3 * 188], InvalidVideoError, 400),  # no frames
        (encode_video(moving_shapes(MAX_FRAMES + 5)), VideoTooLongError, 413),
        (b"\0" * 2_000_001, RequestTooLargeError, 413),
    ],
    ids=["not_a_video", "truncated", "zero_frames", "too_long", "too_large"],
)
def test_bad_files_get_typed_errors(app_url, http_client, data, error, status):
    with pytest.raises(error):
        http_client.open_video(data)
    response = httpx.post(app_url + VIDEOS_PATH, content=data, timeout=60)
    assert response.status_code == status and response.json()["error"]["code"] == error.code


def test_the_track_job_writes_a_row_per_frame_and_object_and_resumes(app_url, tiny112_dir, serve_port, tmp_path):
    """`pipelines.track` through the service and in its own actors: every frame's objects equal the in-process
    session's, a bad file is one row with its error code, and a second run redoes only that one."""
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "clicked.mkv").write_bytes(VIDEO)
    (videos / "lossy.mp4").write_bytes(encode_video(FRAMES))
    (videos / "broken.mp4").write_bytes(b"this is not a video")
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump(cpu_config(str(tiny112_dir), serve_port)))
    prompt = json.dumps({"points": CLICKS["points"], "labels": CLICKS["labels"], "frame": 0})
    expected = in_process(str(tiny112_dir), "objects")
    for via in ("service", "actors"):
        job = TrackJobConfig(input=str(videos), output=str(tmp_path / via), via=via, prompt=prompt, config=config, workers=1)
        summary = run_job(job)
        assert "3 videos" in summary and "2 tracked" in summary and "invalid_video 1" in summary, summary
        table = pq.read_table(tmp_path / via)
        (broken,) = table.filter(pc.equal(table["error_code"], "invalid_video")).to_pylist()
        assert broken["video"].endswith("broken.mp4") and broken["frame_index"] is None
        clicked = sorted(
            table.filter(pc.match_substring(table["video"], "clicked.mkv")).to_pylist(),
            key=lambda row: (row["frame_index"], row["object_id"]),
        )
        assert {row["frames"] for row in clicked} == {len(FRAMES)}
        rows_per_frame = [[row for row in clicked if row["frame_index"] == frame["frame_index"]] for frame in expected]
        for rows, frame in zip(rows_per_frame, expected):
            assert [row["object_id"] for row in rows] == frame["object_ids"]
            for row, mask in zip(rows, frame["masks"]):
                np.testing.assert_array_equal(decode_mask(RleMask(size=row["mask"]["size"], counts=row["mask"]["counts"])), mask)
        again = run_job(job)
        assert "1 videos" in again and "skipped 2 videos done before" in again, again
