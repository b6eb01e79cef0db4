"""The real multi-process application, started from serve_config.yaml's CPU profile with `serve run`.

Checks the two clients against the in-process core and transformers' own pipeline, that batches larger
than one form under concurrent load, and that `user_config` changes the batch size live. The tiny
checkpoint's masks are meaningless (random weights): only agreement matters.

What is compared how (`tests/answers.py`): the service against the in-process core within the bounds that
hold across batch compositions (its batches and caches depend on its traffic); the service against itself
bit for bit where the test makes the computation the same: requests sent one at a time on an image the
replica has cached, each answered from the same features in a batch of one. The clients send an image they
sent before as its `image_id`, so after the first request on IMAGE every test here takes the cached path.
"""

from __future__ import annotations

import io
import time
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image
from pydantic import ValidationError
from ray import serve
from ray.serve.schema import ServeDeploySchema

from client import Sam3HandleClient, Sam3HttpClient, SegmentRequest, SegmentResponse
from client.errors import InvalidPromptError, PromptTooLongError
from client.protocol import Polygon
from deployments.app import build_app
from deployments.config import AppArgs
from sam3_serve_core.checkpoint import load_sam3
from sam3_serve_core.pipeline import Sam3Pipeline
from sam3_serve_core.polygons import mask_polygons
from tests.answers import assert_close_answer, assert_same_answer, expect
from tests.conftest import random_image
from tests.integration.test_parity import assert_same_segmentation, pipeline_for, reference_for
from tests.serve.app_runner import (
    APP_NAME,
    SERVE_CONFIG,
    cpu_config,
    deployment,
    ingress_references,
    model_pool_batch_sizes,
    serve_run,
)
from tests.unit.test_polygons import assert_drawn_back_within

IMAGE = random_image(90, 130, seed=7)
PROMPTS = {
    "text": {"text": "a red car"},
    "boxes": {"boxes": [[10, 12, 70, 60], [60, 20, 125, 85]], "labels": [1, 0]},
    "points": {"points": [[50, 40], [100, 70]], "labels": [1, 0]},
    "one_point": {"points": [[50, 40]], "labels": [1]},
}


@lru_cache(maxsize=1)
def in_process(checkpoint: str) -> Sam3Pipeline:
    return Sam3Pipeline(load_sam3(checkpoint))


def png_path(tmp_path) -> str:
    path = tmp_path / "image.png"
    Image.fromarray(IMAGE).save(path)
    return str(path)


def test_serve_config_is_validated_by_the_builder():
    config = yaml.safe_load(SERVE_CONFIG.read_text())
    ServeDeploySchema.model_validate(config)
    (application,) = config["applications"]
    assert application["import_path"] == "deployments.app:build_app"
    args = AppArgs.model_validate(application["args"])
    assert build_app(args) is not None
    with pytest.raises(ValidationError):
        AppArgs.model_validate({**application["args"], "chekpoint": "typo"})
    pool = deployment(config, "Sam3ModelPool")
    assert pool["ray_actor_options"]["num_gpus"] == 1
    assert pool["autoscaling_config"]["min_replicas"] >= 1
    batch = pool["user_config"]["max_batch_size"]
    assert pool["max_ongoing_requests"] >= batch, "batches cannot fill otherwise"
    assert batch / 2 <= pool["autoscaling_config"]["target_ongoing_requests"] <= 2 * batch


@pytest.mark.parametrize("kind", sorted(PROMPTS))
def test_both_clients_match_the_core_and_transformers(kind, http_client, handle_client, tiny112_dir, tmp_path):
    """Every image input form through both clients: one answer, close to the core's and so to transformers'.

    The core alone is transformers' computation (bit for bit, `tests/integration/test_parity.py`); the
    service's first answer is held to it within the bounds. Every later request here is answered from the
    features of IMAGE that the replica cached (the array by its `image_id`, the PIL image and the file as
    bytes of the same pixels), one at a time: the same computation as the first, so the same bits.
    """
    prompt = PROMPTS[kind]
    core = pipeline_for(str(tiny112_dir))  # a new pipeline: no text encoding from another batch
    assert_same_segmentation(core.segment(IMAGE, **prompt), reference_for(str(tiny112_dir), IMAGE, prompt))
    expected = expect(core, IMAGE, **prompt)
    assert expected.at_threshold().union_mask.any(), "an empty expected mask would make the comparison say little"
    first = None
    for client in (http_client, handle_client):
        for image_input in (IMAGE, Image.fromarray(IMAGE), png_path(tmp_path)):
            result = client.run_with_detections(model_id="sam3", image_input=image_input, **prompt)
            assert sorted(result) == ["boxes", "labels", "masks", "scores", "union_mask"]
            if first is None:
                first = result
                assert_close_answer(result, expected)
            assert_same_answer(result, first)
            if kind in ("points", "one_point"):
                assert result["masks"] == result["boxes"] == result["scores"] == result["labels"] == []
                continue
            assert len(result["masks"]) > 0
            assert result["scores"] == sorted(result["scores"], reverse=True)
            assert result["labels"] == [0] * len(result["scores"]), "one prompt: every instance answers it"
        union = client.run(image_input=IMAGE, **prompt)
        assert union.dtype == np.uint8 and union.shape == IMAGE.shape[:2]
        assert_same_answer(union, first)


def test_the_two_clients_agree_exactly(http_client, handle_client):
    """One request at a time, both by IMAGE's `image_id` (the cached path): the same computation, the same bits."""
    for prompt in PROMPTS.values():
        over_http = http_client.run_with_detections(IMAGE, **prompt)
        over_handle = handle_client.run_with_detections(IMAGE, **prompt)
        assert_same_answer(over_http, over_handle)
        assert over_http["boxes"] == over_handle["boxes"] and over_http["scores"] == over_handle["scores"]


def test_aliases_of_the_client_api(http_client, handle_client):
    """One request at a time on cached IMAGE: the same computation, so the same bits."""
    for client in (http_client, handle_client):
        np.testing.assert_array_equal(
            client.run(IMAGE, text_prompt="a red car"), client.run(IMAGE, text="a red car")
        )
        np.testing.assert_array_equal(
            client.run(IMAGE, prompts=[[50, 40]], labels=[1]), client.run(IMAGE, points=[[50, 40]], labels=[1])
        )


def test_both_clients_raise_the_same_typed_errors(http_client, handle_client):
    for client in (http_client, handle_client):
        with pytest.raises(PromptTooLongError):
            client.run(IMAGE, text="word " * 40)
        with pytest.raises(InvalidPromptError):
            client.run(IMAGE, boxes=[[50, 50, 10, 10]], labels=[1])


def test_a_bad_item_does_not_fail_its_batch(http_client, tiny112_dir):
    """Good and bad requests sent together: every good one is answered, every bad one gets its error.

    The good ones share model batches of varying size (by IMAGE's id, the cached path): each is held to the
    core within the bounds, not to one another bit for bit."""
    expected = expect(in_process(str(tiny112_dir)), IMAGE, text="a red car")
    assert expected.at_threshold().union_mask.any()

    def call(index: int):
        if index % 3 == 0:
            with pytest.raises(InvalidPromptError):
                http_client.run(IMAGE, boxes=[[5, 5, 5, 5]], labels=[1])
            return None
        return http_client.run(IMAGE, text="a red car")

    with ThreadPoolExecutor(max_workers=12) as pool:
        results = list(pool.map(call, range(36)))
    assert sum(result is not None for result in results) == 24
    for result in results:
        if result is not None:
            assert_close_answer(result, expected)


def concurrent_load(http_client, requests: int, concurrency: int) -> None:
    image = io.BytesIO()
    Image.fromarray(IMAGE).save(image, format="PNG")
    kinds = list(PROMPTS.values())
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(lambda i: http_client.run(image.getvalue(), **kinds[i % len(kinds)]), range(requests)))


def test_batches_larger_than_one_form_under_load(http_client):
    before = model_pool_batch_sizes()
    concurrent_load(http_client, requests=64, concurrency=16)
    after = model_pool_batch_sizes()
    new_batches = {size: after.get(size, 0) - before.get(size, 0) for size in after}
    assert sum(size * count for size, count in new_batches.items()) >= 64
    assert max(size for size, count in new_batches.items() if count > 0) > 1, new_batches
    print(f"model pool batch sizes under load (size: count): {dict(sorted(new_batches.items()))}")


def test_user_config_changes_batch_size_live(app_url, ray_address, tiny112_dir, tmp_path, http_client):
    """A `serve run` of the same config with a new user_config reconfigures the replica in place."""
    config = cpu_config(str(tiny112_dir), int(app_url.rsplit(":", 1)[1]))
    deployment(config, "Sam3ModelPool")["user_config"]["max_batch_size"] = 2
    replicas_before = serve.status().applications[APP_NAME].deployments["Sam3ModelPool"].replica_states
    serve_run(config, tmp_path / "config.yaml", ray_address)
    before = model_pool_batch_sizes()
    concurrent_load(http_client, requests=48, concurrency=16)
    after = model_pool_batch_sizes()
    new_sizes = {size for size in after if after.get(size, 0) > before.get(size, 0)}
    assert new_sizes and max(new_sizes) <= 2, new_sizes
    assert serve.status().applications[APP_NAME].deployments["Sam3ModelPool"].replica_states == replicas_before


def test_handle_client_works_inside_a_ray_task(http_client):
    """Ray jobs (and Ray Data tasks) on the same cluster call the application through its handle."""
    import ray

    @ray.remote(num_cpus=0.1)
    def segment_in_a_task(image: np.ndarray) -> np.ndarray:
        return Sam3HandleClient(APP_NAME).run(image, text="a red car")

    # The task's client starts with no ids and sends the bytes, the HTTP client sends IMAGE's id: both reach the
    # features the replica cached, one request at a time, so the same computation and the same bits.
    in_a_task = ray.get(segment_in_a_task.remote(IMAGE))
    assert_same_answer(in_a_task, http_client.run(IMAGE, text="a red car"))
    assert in_a_task.any()


def test_versioned_api_with_openapi_health_readiness_and_info(app_url, tiny112_dir):
    import httpx

    spec = httpx.get(f"{app_url}/openapi.json", timeout=10).json()
    assert {"/v1/segment", "/v1/health", "/v1/ready", "/v1/info"} <= set(spec["paths"])
    assert "requestBody" in spec["paths"]["/v1/segment"]["post"]
    up = {"status": "ok", "api_version": "v1", "ready": True, "reason": None}
    assert httpx.get(f"{app_url}/v1/health", timeout=10).json() == up
    ready = httpx.get(f"{app_url}/v1/ready", timeout=10)
    assert (ready.status_code, ready.json()) == (200, up)
    with Sam3HttpClient(app_url) as client:
        assert client.health() and client.ready()
    info = httpx.get(f"{app_url}/v1/info", timeout=10).json()
    assert (info["checkpoint"], info["random_weights"], info["api_key_required"]) == (tiny112_dir.name, True, False)
    wrong_version = httpx.post(f"{app_url}/v2/segment", json={}, timeout=10)
    assert wrong_version.status_code == 404
    assert wrong_version.json()["error"]["code"] == "not_found"


def test_several_texts_with_a_threshold_through_both_clients(http_client, handle_client, tiny112_dir):
    """One request, several concepts and its own threshold: the same answer as the core in one process."""
    texts = ["a red car", "dog", "cat"]
    expected = expect(in_process(str(tiny112_dir)), IMAGE, text=texts, score_threshold=0.3)
    labels = set(expected.at_threshold().labels.tolist())
    assert len(labels) > 1, "instances of more than one concept, or the test says little"
    for client in (http_client, handle_client):
        # The replica may hold text encodings made in other batches: within the bounds, not bit for bit.
        result = client.run_with_detections(image_input=IMAGE, text=texts, score_threshold=0.3)
        assert_close_answer(result, expected)
        assert_close_answer(client.run(image_input=IMAGE, text=texts, score_threshold=0.3), expected)


def test_max_instances_returns_the_top_scoring_instances_and_their_union(http_client):
    """The same text prompt with and without `max_instances=2`: the limited answer is the first two instances
    of the unlimited one, still sorted by score, and its union covers those two only."""
    unlimited = http_client.run_with_detections(IMAGE, text="a red car")
    limited = http_client.run_with_detections(IMAGE, text="a red car", max_instances=2)
    count = len(unlimited["scores"])
    assert count > 2, "more instances than the limit, or the test says little"
    assert len(limited["scores"]) == len(limited["boxes"]) == len(limited["masks"]) == min(2, count)
    assert limited["scores"] == unlimited["scores"][:2]
    assert limited["scores"] == sorted(limited["scores"], reverse=True)
    assert limited["boxes"] == unlimited["boxes"][:2]
    assert limited["labels"] == unlimited["labels"][:2]
    for kept, first in zip(limited["masks"], unlimited["masks"][:2], strict=True):
        np.testing.assert_array_equal(kept, first)
    np.testing.assert_array_equal(limited["union_mask"], np.maximum.reduce(limited["masks"]))
    np.testing.assert_array_equal(http_client.run(IMAGE, text="a red car", max_instances=2), limited["union_mask"])


@pytest.mark.parametrize("client_name", ["http_client", "handle_client"])
def test_polygons_outline_the_answers_own_masks(request, client_name):
    """Each instance's polygons (and the union's, also for a point prompt's object) are the outlines of the
    masks in the same answer: `sam3_serve_core.polygons` on them, drawn back within its bound."""
    client = request.getfixturevalue(client_name)
    for prompt in ({"text": "a red car", "max_instances": 5}, {"points": [[40, 30]], "labels": [1]}):
        result = client.run_with_detections(IMAGE, **prompt, polygons=True, polygon_tolerance=1.0)
        assert len(result["polygons"]) == len(result["masks"])
        for mask, regions in zip(result["masks"], result["polygons"], strict=True):
            assert regions == [region.model_dump(mode="json") for region in mask_polygons(mask, 1.0)]
        union = [region.model_dump(mode="json") for region in mask_polygons(result["union_mask"], 1.0)]
        assert result["union_polygons"] == union and union, "an empty outline would make the test say little"
        assert_drawn_back_within(result["union_mask"] // 255, [Polygon(**region) for region in union], 1.0)


def test_answers_carry_their_time_per_stage(app_url):
    """In the body (`timings_ms`) and as a `Server-Timing` header, which browser tools show."""
    body = SegmentRequest(image=png_bytes(), text="cat", return_detections=False)
    response = httpx.post(app_url + "/v1/segment", content=body.model_dump_json(), headers={"content-type": "application/json"})
    assert response.status_code == 200
    timings = SegmentResponse.model_validate_json(response.content).timings_ms
    assert set(timings) == {"preprocess", "vision", "queue", "model", "postprocess", "total"}
    assert all(value >= 0 for value in timings.values())
    assert timings["total"] >= timings["preprocess"] + timings["model"] + timings["postprocess"]
    assert timings["vision"] <= timings["model"], "the ViT pass is part of the model's time"
    assert [part.split(";")[0] for part in response.headers["server-timing"].split(", ")] == list(timings)


def test_the_ingress_lets_go_of_every_request_it_answered(http_client):
    """The ingress passes each request's prepared item on to the model pool by reference; once answered,
    nothing of it stays. Serve's index of pending requests by model would keep every one, and its prepared
    image with it, without the router's pruning (`ImageAffinityRouter._forget_routed_requests`): 200
    requests left 200 more references, and the memory grew by about 40 kB a request at 112 px."""
    http_client.run(IMAGE, text="cat")
    before = ingress_references()
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda _: http_client.run(IMAGE, text="cat"), range(200)))
    # The router prunes the requests routed before the one it is routing: one more request, alone, lets it
    # prune them all. The model replica lets go of what it borrowed a moment after answering: wait for that.
    http_client.run(IMAGE, text="cat")
    deadline = time.monotonic() + 10
    while (grown := ingress_references() - before) >= 50 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert grown < 50, f"the ingress holds {grown} more references after 200 answered requests"


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(IMAGE).save(buffer, format="PNG")
    return buffer.getvalue()
