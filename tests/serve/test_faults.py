"""Faults under load: killed replicas and live redeploys lose no request.

A bounded load on localhost runs while a model-pool replica and a preprocessor replica are killed, and
while `serve run` applies a new batch size (in place) and a new checkpoint (replicas replaced). With the
clients' retries on, every request must succeed; with retries off, every request must still end in a
result or a typed error, never a hang. The application recovers without a restart by hand.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import ray
from ray import serve

from client import Sam3HttpClient
from client.errors import Sam3Error
from deployments.core.tiny_checkpoint import build_tiny_checkpoint
from deployments.profiles import set_default_checkpoint
from tests.conftest import random_image
from tests.serve.app_runner import APP_NAME, cpu_config, deployment, replica_count, serve_run
from tests.serve.load import LoadGenerator

IMAGE = random_image(90, 130, seed=11)
PROMPTS = [{"text": "a red car"}, {"boxes": [[10, 12, 70, 60]], "labels": [1]}, {"points": [[50, 40]], "labels": [1]}]


@pytest.fixture(scope="module")
def app(ray_address, serve_port, tiny112_dir, tmp_path_factory):
    config = cpu_config(str(tiny112_dir), serve_port)
    path = tmp_path_factory.mktemp("faults") / "config.yaml"
    url = serve_run(config, path, ray_address)
    yield url, config, path
    serve.delete(APP_NAME)


def kill_one_replica(deployment_name: str) -> str:
    """Kill a replica's actor the hard way, as a crash or a lost node would."""
    prefix = f"SERVE_REPLICA::{APP_NAME}#{deployment_name}#"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    assert names, f"no running replica of {deployment_name}"
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    return names[0]


def wait_until_recovered(timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications[APP_NAME]
        if status.status == "RUNNING" and all(
            replica_count(name) >= 1 and d.status == "HEALTHY" for name, d in status.deployments.items()
        ):
            return
        time.sleep(0.5)
    pytest.fail(f"application did not recover: {serve.status()}")


def expected_answers(client: Sam3HttpClient) -> list[np.ndarray]:
    return [client.run(IMAGE, **prompt) for prompt in PROMPTS]


def checking_call(client: Sam3HttpClient, expected: list[np.ndarray] | None):
    """One request of a rotating prompt type; right when it equals the answer before the fault."""
    counter = iter(range(10**9))

    def call() -> bool:
        index = next(counter) % len(PROMPTS)
        mask = client.run(IMAGE, **PROMPTS[index])
        if expected is None:
            return mask.shape == IMAGE.shape[:2] and mask.dtype == np.uint8
        return np.array_equal(mask, expected[index])

    return call


def test_killed_replicas_lose_no_request_with_retries(app):
    url, _, _ = app
    with Sam3HttpClient(url, timeout=60, retries=8, backoff_s=0.2, max_backoff_s=2.0) as client:
        load = LoadGenerator(checking_call(client, expected_answers(client)))
        try:
            load.set_concurrency(6)
            time.sleep(2)
            killed = [kill_one_replica("Sam3ModelPool")]
            time.sleep(4)
            killed.append(kill_one_replica("Sam3Preprocessor"))
            wait_until_recovered()
            time.sleep(3)
        finally:
            load.stop()
    print(f"faults: killed {killed}; {load.answered} requests answered, {len(load.failures)} failed")
    assert not load.failures, load.failures[:3]
    assert load.wrong == 0
    assert load.answered > 20


def test_without_retries_every_request_still_ends_in_an_answer_or_a_typed_error(app):
    url, _, _ = app
    with Sam3HttpClient(url, timeout=30, retries=0) as client:
        load = LoadGenerator(checking_call(client, expected_answers(client)))
        try:
            load.set_concurrency(6)
            time.sleep(1)
            kill_one_replica("Sam3ModelPool")
            wait_until_recovered()
            time.sleep(2)
        finally:
            load.stop()
    print(f"faults without retries: {load.answered} answered, {len(load.failures)} typed errors")
    assert all(isinstance(error, Sam3Error) for error in load.failures), load.failures[:3]
    assert load.wrong == 0
    assert load.answered > 10


def test_live_redeploys_lose_no_request(app, ray_address, tmp_path):
    url, config, path = app
    with Sam3HttpClient(url, timeout=60, retries=8, backoff_s=0.2, max_backoff_s=2.0) as client:
        before = client.run(IMAGE, **PROMPTS[2])
        load = LoadGenerator(checking_call(client, None))
        try:
            load.set_concurrency(6)
            time.sleep(2)
            deployment(config, "Sam3ModelPool")["user_config"]["max_batch_size"] = 4
            serve_run(config, path, ray_address)
            answered_after_batch_change = load.answered
            new_checkpoint = build_tiny_checkpoint(tmp_path / "tiny-seed-1", image_size=112, seed=1)
            set_default_checkpoint(config["applications"][0]["args"], str(new_checkpoint))
            serve_run(config, path, ray_address)
            wait_until_recovered()
            time.sleep(3)
        finally:
            load.stop()
        after = client.run(IMAGE, **PROMPTS[2])
    print(f"redeploys: {load.answered} requests answered, {len(load.failures)} failed")
    assert not load.failures, load.failures[:3]
    assert load.wrong == 0
    assert load.answered > answered_after_batch_change > 0
    assert serve.status().applications[APP_NAME].deployments["Sam3ModelPool"].status == "HEALTHY"
    assert not np.array_equal(after, before), "the new checkpoint's weights answer now"


def test_a_full_queue_answers_503_with_retry_after(app, ray_address):
    """A bounded ingress queue: overflow is an immediate 503 with Retry-After, which clients retry."""
    import io
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    from PIL import Image

    url, config, path = app
    deployment(config, "Sam3Ingress").update(max_ongoing_requests=2, max_queued_requests=2)
    deployment(config, "Sam3ModelPool")["user_config"] = {"max_batch_size": 2, "batch_wait_timeout_s": 0.2}
    serve_run(config, path, ray_address)
    wait_until_recovered()
    buffer = io.BytesIO()
    Image.fromarray(IMAGE).save(buffer, format="PNG")
    body = {"image": __import__("base64").b64encode(buffer.getvalue()).decode(), "text": "a red car"}

    with ThreadPoolExecutor(max_workers=24) as threads:
        responses = list(threads.map(lambda _: httpx.post(f"{url}/v1/segment", json=body, timeout=60), range(24)))
    statuses = [response.status_code for response in responses]
    assert set(statuses) <= {200, 503}, statuses
    rejected = [response for response in responses if response.status_code == 503]
    assert rejected and 200 in statuses, statuses
    for response in rejected:
        assert response.headers["Retry-After"] == "1"

    with Sam3HttpClient(url, timeout=120, retries=20, backoff_s=0.2, max_backoff_s=2.0) as client:
        with ThreadPoolExecutor(max_workers=24) as threads:
            masks = list(threads.map(lambda _: client.run(IMAGE, text="a red car"), range(24)))
    assert all(mask.shape == IMAGE.shape[:2] for mask in masks)
    print(f"full queue: {len(rejected)} of 24 rejected with 503 + Retry-After; with retries all 24 answered")
