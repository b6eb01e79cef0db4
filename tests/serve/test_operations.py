"""Operating the application: several checkpoints by `model_id`, request ids, and the metrics it exports.

One application serves two tiny checkpoints of different resolutions (112 as `sam3`, the default, and 56
as `small`), with room for one model per replica, so alternating requests also unload and reload them.
The tiny checkpoints' masks are meaningless (random weights): only agreement with the in-process
pipeline on the same checkpoint matters, within the bounds that hold across batch compositions
(`tests/answers.py`): the requests here run concurrently, in batches of varying size.
"""

from __future__ import annotations

import re
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import httpx
import pytest
import ray
from ray import serve

from client import ModelNotFoundError, Sam3HandleClient, Sam3HttpClient, SegmentRequest
from client.errors import InvalidPromptError, Sam3Error
from client.protocol import InfoResponse
from client.images import encode_image
from sam3_serve_core.checkpoint import load_sam3
from sam3_serve_core.pipeline import Sam3Pipeline
from tests.answers import Expected, assert_close_answer, close_answer, expect
from tests.conftest import random_image, tiny_checkpoint_dir
from tests.serve.app_runner import APP_NAME, cpu_config, serve_run
from tests.videos import encode_video, moving_shapes

IMAGE = random_image(90, 130, seed=11)
PROMPTS = [
    {"text": "a red car"},
    {"boxes": [[10, 12, 70, 60]], "labels": [1]},
    {"points": [[50, 40]], "labels": [1]},
]


@lru_cache(maxsize=2)
def in_process(checkpoint: str) -> Sam3Pipeline:
    return Sam3Pipeline(load_sam3(checkpoint))


@pytest.fixture(scope="module")
def checkpoints() -> dict[str, str]:
    return {"sam3": str(tiny_checkpoint_dir(112)), "small": str(tiny_checkpoint_dir(56))}


@pytest.fixture(scope="module")
def app_url(ray_address, serve_port, checkpoints, tmp_path_factory):
    config = cpu_config(checkpoints["sam3"], serve_port)
    args = config["applications"][0]["args"]
    args.update(models=checkpoints, default_model="sam3", max_models_per_replica=1)
    yield serve_run(config, tmp_path_factory.mktemp("serve") / "config.yaml", ray_address)
    serve.delete(APP_NAME)


@pytest.fixture(scope="module")
def clients(app_url):
    with Sam3HttpClient(app_url, timeout=120) as http_client:
        yield {"http": http_client, "handle": Sam3HandleClient(APP_NAME, timeout=120)}


@lru_cache(maxsize=8)
def expected_answer(checkpoint: str, prompt_index: int) -> Expected:
    expected = expect(in_process(checkpoint), IMAGE, **PROMPTS[prompt_index])
    assert expected.at_threshold().union_mask.any(), "an empty expected mask would make the comparison say little"
    return expected


# Several checkpoints by model_id


def test_each_model_id_answers_with_its_own_checkpoint(clients, checkpoints):
    """Interleaved and concurrent requests for both models: each answer is its own checkpoint's, so no
    batch mixed the two (their resolutions differ) and unloading one never broke a request for it."""
    jobs = [(model_id, index) for _ in range(3) for model_id in ("sam3", "small") for index in range(len(PROMPTS))]

    def call(job):
        model_id, index = job
        client = clients["http"] if hash(str(job)) % 2 else clients["handle"]
        # IMAGE's `image_id` is per checkpoint: each client sends the bytes on its first request for a model,
        # its id after that (the cached path, or the bytes again where a reload emptied the cache). Both
        # paths are meant; each answer is held to the same bounds.
        return client.run_with_detections(IMAGE, model_id=model_id, **PROMPTS[index])

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(call, jobs))
    for (model_id, index), result in zip(jobs, results):
        assert_close_answer(result, expected_answer(checkpoints[model_id], index))
    small = expected_answer(checkpoints["small"], 0).at_threshold()
    default = expected_answer(checkpoints["sam3"], 0)
    assert not close_answer(small, default), "the two checkpoints must answer differently, or the test says little"
    for client in clients.values():
        assert_close_answer(client.run_with_detections(IMAGE, **PROMPTS[0]), default)


def test_the_model_pool_holds_at_most_its_bound(clients):
    clients["http"].run(IMAGE, model_id="small", text="a red car")
    stats = serve.get_deployment_handle("Sam3ModelPool", app_name=APP_NAME).stats.remote().result(timeout_s=60)
    assert stats["models"] == ["small"], "max_models_per_replica=1: loading `small` unloaded `sam3`"


def info_once(app_url: str, loaded: dict[str, int], timeout_s: float = 30) -> InfoResponse:
    """`/v1/info` once it reports `loaded` (model id -> replicas): replicas report what they load to Serve's
    controller, which tells the ingress's router, so the answer follows within seconds, not at once."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = InfoResponse.model_validate_json(httpx.get(app_url + "/v1/info").content)
        if {model.model_id: model.loaded_replicas for model in info.models} == loaded or time.monotonic() > deadline:
            return info
        time.sleep(0.25)


def test_info_lists_every_model_with_its_resolution_and_where_it_is_loaded(clients, checkpoints, app_url):
    """One model replica with room for one model: asking for a model loads it there and unloads the other,
    and `/v1/info` says so."""
    clients["http"].run(IMAGE, model_id="small", text="a red car")
    info = info_once(app_url, {"sam3": 0, "small": 1})
    assert [model.model_dump() for model in info.models] == [
        {
            "model_id": "sam3", "checkpoint": Path(checkpoints["sam3"]).name, "default": True, "random_weights": True,
            "image_size": 112, "loaded_replicas": 0,
        },
        {
            "model_id": "small", "checkpoint": Path(checkpoints["small"]).name, "default": False,
            "random_weights": True, "image_size": 56, "loaded_replicas": 1,
        },
    ]
    assert (info.checkpoint, info.random_weights) == (Path(checkpoints["sam3"]).name, True), "the default model's"
    clients["handle"].run(IMAGE, text="a red car")
    info = info_once(app_url, {"sam3": 1, "small": 0})
    assert [(model.model_id, model.loaded_replicas) for model in info.models] == [("sam3", 1), ("small", 0)]


@pytest.mark.parametrize("kind", ["http", "handle"])
def test_an_unknown_model_id_is_a_typed_404(clients, kind):
    with pytest.raises(ModelNotFoundError, match="no model 'sam2'") as raised:
        clients[kind].run(IMAGE, model_id="sam2", text="a red car")
    assert raised.value.http_status == 404 and raised.value.code == "model_not_found"
    assert raised.value.request_id


def test_the_raw_http_answer_for_an_unknown_model(app_url):
    body = SegmentRequest(image=encode_image(IMAGE, timeout=None), text="cat", model_id="sam2").model_dump_json()
    answer = httpx.post(app_url + "/v1/segment", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == 404
    error = answer.json()["error"]
    assert error["code"] == "model_not_found" and "'sam3', 'small'" in error["message"]
    assert error["request_id"] == answer.headers["x-request-id"]


# Request ids


def ingress_log_text() -> str:
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    return "\n".join(path.read_text(errors="replace") for path in (session / "logs" / "serve").glob("*Sam3Ingress*"))


def wait_for_log_line(pattern: str, timeout_s: float = 30) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = re.search(pattern, ingress_log_text())
        if found:
            return found.group(0)
        time.sleep(0.5)
    raise AssertionError(f"no ingress log line matches {pattern!r}")


def test_every_answer_carries_a_request_id(app_url):
    body = SegmentRequest(image=encode_image(IMAGE, timeout=None), text="cat").model_dump_json()
    headers = {"content-type": "application/json"}
    ok = httpx.post(app_url + "/v1/segment", content=body, headers=headers)
    assert ok.status_code == 200 and ok.headers["x-request-id"]
    own = httpx.post(app_url + "/v1/segment", content=body, headers={**headers, "x-request-id": "caller-chose-this"})
    assert own.status_code == 200 and own.headers["x-request-id"] == "caller-chose-this"
    for answer in (
        httpx.post(app_url + "/v1/segment", content=b"{", headers=headers),
        httpx.post(app_url + "/v1/segment", content=body, headers={"content-type": "text/plain"}),
        httpx.get(app_url + "/no/such/route"),
        httpx.get(app_url + "/v1/health"),
    ):
        assert answer.headers["x-request-id"], f"{answer.request.url} {answer.status_code}"
    bad = httpx.post(app_url + "/v1/segment", content=b"{", headers={**headers, "x-request-id": "bad-json-1"})
    assert bad.status_code == 400 and bad.json()["error"]["request_id"] == "bad-json-1"


@pytest.mark.parametrize("kind", ["http", "handle"])
def test_a_failed_request_is_logged_under_the_id_its_exception_carries(clients, kind):
    with pytest.raises(InvalidPromptError) as raised:
        clients[kind].run(IMAGE, boxes=[[50, 50, 10, 10]], labels=[1])
    request_id = raised.value.request_id
    assert request_id and request_id in str(raised.value)
    line = wait_for_log_line(rf"request {re.escape(request_id)} failed: 422 invalid_prompt[^\n]*")
    assert "x0 < x1" in line or "box" in line


# Metrics


def scrape() -> str:
    port = ray.nodes()[0]["MetricsExportPort"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        return answer.read().decode()


def series(text: str, name: str, **tags: str) -> list[str]:
    """Lines of metric `name` whose tags include `tags` (Serve adds application, deployment and replica)."""
    lines = [line for line in text.splitlines() if line.startswith(name + "{")]
    return [line for line in lines if all(f'{key}="{value}"' in line for key, value in tags.items())]


def test_the_metrics_endpoint_has_each_metric_with_its_tags(clients):
    for prompt in PROMPTS:
        clients["http"].run(IMAGE, **prompt)
    with pytest.raises(Sam3Error):
        clients["http"].run(IMAGE, model_id="sam2", text="cat")
    with pytest.raises(InvalidPromptError):
        clients["handle"].run(IMAGE, boxes=[[50, 50, 10, 10]], labels=[1])
    video = encode_video(moving_shapes(4), "matroska", "ffv1")
    assert len(list(clients["http"].track(video, points=[[20, 15]], labels=[1]))) == 4
    session = clients["http"].open_video(video)  # held, so the replica's session gauges show it

    wanted = {
        "ray_sam3_requests_total": [{"model_id": "sam3", "prompt_type": kind} for kind in ("text", "boxes", "points")],
        "ray_sam3_request_errors_total": [
            {"model_id": "unknown", "prompt_type": "text", "error_code": "model_not_found"},
            {"model_id": "sam3", "prompt_type": "boxes", "error_code": "invalid_prompt"},
        ],
        "ray_sam3_stage_latency_ms_bucket": [
            {"model_id": "sam3", "stage": stage} for stage in ("preprocess", "queue", "model", "postprocess", "total")
        ],
        "ray_sam3_instances_per_answer_bucket": [{"model_id": "sam3", "prompt_type": "text"}],
        "ray_sam3_image_pixels_bucket": [{"model_id": "sam3"}],
        "ray_sam3_model_batch_size_bucket": [{"model_id": "sam3", "deployment": "Sam3ModelPool"}],
        "ray_sam3_model_batch_prompts_bucket": [{"model_id": "sam3", "deployment": "Sam3ModelPool"}],
        "ray_sam3_video_frames_total": [{"model_id": "sam3", "task": "objects"}],
        "ray_sam3_video_sessions_ended_total": [{"model_id": "sam3", "reason": "closed"}],
        "ray_sam3_video_sessions": [{"model_id": "sam3"}, {"model_id": "small"}],
        "ray_sam3_video_session_bytes": [{"model_id": "sam3"}],
    }
    deadline, missing = time.monotonic() + 90, wanted
    while missing and time.monotonic() < deadline:
        text = scrape()
        missing = {
            name: [tags for tags in tag_sets if not series(text, name, application=APP_NAME, **tags)]
            for name, tag_sets in wanted.items()
        }
        missing = {name: tag_sets for name, tag_sets in missing.items() if tag_sets}
        time.sleep(2)
    assert not missing, f"not exported within 90 s: {missing}"
    clients["http"].close_video(session.session_id)
    # One series per ingress replica: earlier modules' applications in this Ray session export theirs too.
    errors = series(text, "ray_sam3_request_errors_total", error_code="model_not_found")
    assert sum(float(line.rsplit(" ", 1)[1]) for line in errors) >= 1
