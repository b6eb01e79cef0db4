"""Faults under load: killed replicas and live redeploys lose no request.

A bounded load on localhost runs while a model-pool replica and a preprocessor replica are killed, and
while `serve run` applies a new batch size (in place) and a new checkpoint (replicas replaced). With the
clients' retries on, every request must succeed; with retries off, every request must still end in a
result or a typed error, never a hang. The application recovers without a restart by hand.

Each test waits for answers (a number before a fault and after each recovery), which the code guarantees,
not for a time that gives enough of them only on an idle machine. A right answer is one within the bounds
of the in-process pipeline's (`tests/answers.py`): requests share batches of varying size, and a new model
replica encodes the image anew. After its first answer the client sends IMAGE's `image_id`; a new model
replica does not hold it, answers 404 and gets the bytes again: both paths, cached and not, are meant.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import ray
from ray import serve

from client import Sam3HttpClient
from client.errors import Sam3Error
from deployments.config import set_default_checkpoint
from sam3_serve_core.checkpoint import load_sam3
from sam3_serve_core.pipeline import Sam3Pipeline
from tests.answers import Expected, close_answer, expect
from tests.conftest import random_image
from tests.serve.app_runner import APP_NAME, cpu_config, deployment, replica_count, serve_run
from tests.serve.load import LoadGenerator
from tools.tiny_checkpoint import build_tiny_checkpoint

IMAGE = random_image(90, 130, seed=11)
PROMPTS = [{"text": "a red car"}, {"boxes": [[10, 12, 70, 60]], "labels": [1]}, {"points": [[50, 40]], "labels": [1]}]


@pytest.fixture(scope="module")
def app(ray_address, serve_port, tiny112_dir, tmp_path_factory):
    config = cpu_config(str(tiny112_dir), serve_port)
    path = tmp_path_factory.mktemp("faults") / "config.yaml"
    url = serve_run(config, path, ray_address)
    yield url, config, path
    serve.delete(APP_NAME)


def replica_names(deployment_name: str) -> list[str]:
    prefix = f"SERVE_REPLICA::{APP_NAME}#{deployment_name}#"
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]


def kill_one_replica(deployment_name: str) -> str:
    """Kill a replica's actor the hard way, as a crash or a lost node would."""
    names = replica_names(deployment_name)
    assert names, f"no running replica of {deployment_name}"
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    return names[0]


def wait_until_recovered(killed: str | None = None, timeout_s: float = 180) -> None:
    """Until every deployment is HEALTHY with a running replica and, with `killed` (a replica's actor name),
    its deployment has a new replica in its place; or the test fails."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications[APP_NAME]
        replaced = killed is None or any(name != killed for name in replica_names(killed.split("#")[1]))
        if replaced and status.status == "RUNNING" and all(
            replica_count(name) >= 1 and d.status == "HEALTHY" for name, d in status.deployments.items()
        ):
            return
        time.sleep(0.5)
    pytest.fail(f"application did not recover: {serve.status()}")


@pytest.fixture(scope="module")
def expected(tiny112_dir) -> list[Expected]:
    """The in-process answer to each prompt: not empty, or a comparison with it would say little."""
    pipeline = Sam3Pipeline(load_sam3(str(tiny112_dir)))
    answers = [expect(pipeline, IMAGE, **prompt) for prompt in PROMPTS]
    assert all(answer.at_threshold().union_mask.any() for answer in answers)
    return answers


def checking_call(client: Sam3HttpClient, expected: list[Expected] | None):
    """One request of a rotating prompt type; right when it is within the bounds of the in-process answer
    (or, with no expected answers, when it is a mask of the image's size)."""
    counter = iter(range(10**9))

    def call() -> bool:
        index = next(counter) % len(PROMPTS)
        mask = client.run(IMAGE, **PROMPTS[index])
        if expected is None:
            return mask.shape == IMAGE.shape[:2] and mask.dtype == np.uint8
        return close_answer(mask, expected[index])

    return call


def test_killed_replicas_lose_no_request_with_retries(app, expected):
    url, _, _ = app
    with Sam3HttpClient(url, timeout=60, retries=8, backoff_s=0.2, max_backoff_s=2.0) as client:
        load = LoadGenerator(checking_call(client, expected))
        try:
            load.set_concurrency(6)
            load.wait_for_answers(6)  # the load is flowing
            killed = [kill_one_replica("Sam3ModelPool")]
            wait_until_recovered(killed[-1])
            load.wait_for_answers(load.answered + 6)  # answered again, with the new model replica
            killed.append(kill_one_replica("Sam3Preprocessor"))
            wait_until_recovered(killed[-1])
            load.wait_for_answers(load.answered + 6)  # and with the new preprocessor replica
        finally:
            load.stop()
    print(f"faults: killed {killed}; {load.answered} requests answered, {len(load.failures)} failed")
    assert not load.failures, load.failures[:3]
    assert load.wrong == 0
    assert load.answered >= 18


def test_without_retries_every_request_still_ends_in_an_answer_or_a_typed_error(app, expected):
    url, _, _ = app
    with Sam3HttpClient(url, timeout=30, retries=0) as client:
        load = LoadGenerator(checking_call(client, expected))
        try:
            load.set_concurrency(6)
            load.wait_for_answers(6)
            killed = kill_one_replica("Sam3ModelPool")
            wait_until_recovered(killed)
            load.wait_for_answers(load.answered + 6)  # requests are answered again once it has recovered
        finally:
            load.stop()
    print(f"faults without retries: {load.answered} answered, {len(load.failures)} typed errors")
    assert all(isinstance(error, Sam3Error) for error in load.failures), load.failures[:3]
    assert load.wrong == 0
    assert load.answered >= 12


def test_live_redeploys_lose_no_request(app, ray_address, tmp_path):
    url, config, path = app
    with Sam3HttpClient(url, timeout=60, retries=8, backoff_s=0.2, max_backoff_s=2.0) as client:
        before = client.run(IMAGE, **PROMPTS[2])
        assert before.any(), "an empty mask would not tell the checkpoints apart"
        # The checkpoint changes under the load, so a right answer here is one of the image's size.
        load = LoadGenerator(checking_call(client, None))
        try:
            load.set_concurrency(6)
            load.wait_for_answers(6)
            deployment(config, "Sam3ModelPool")["user_config"]["max_batch_size"] = 4
            serve_run(config, path, ray_address)
            load.wait_for_answers(load.answered + 6)  # with the new batch size
            new_checkpoint = build_tiny_checkpoint(tmp_path / "tiny-seed-1", image_size=112, seed=1)
            set_default_checkpoint(config["applications"][0]["args"], str(new_checkpoint))
            serve_run(config, path, ray_address)
            wait_until_recovered()
            load.wait_for_answers(load.answered + 6)  # with the new checkpoint
        finally:
            load.stop()
        after = client.run(IMAGE, **PROMPTS[2])
    print(f"redeploys: {load.answered} requests answered, {len(load.failures)} failed")
    assert not load.failures, load.failures[:3]
    assert load.wrong == 0
    assert load.answered >= 18
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
