"""Two Ray nodes on one machine: the model pool on the node that offers `sam3_model`, the rest on the head.

`ray start --head` offers CPUs and no `sam3_model`; a second `ray start` joins it offering one `sam3_model`
and no CPU. The application is the CPU profile with `--model-resource sam3_model`, so the model pool's
replica can run only on the second node and everything else (ingress, preprocessor, postprocessor) only on
the head, as on a cluster of CPU nodes and GPU nodes. Two things come from sharing one machine: only the
head runs an HTTP proxy (two would bind the same port), and the model replica asks for no CPU (the
worker offers none, so that nothing else can land there).

Killing the worker node as a crash would (SIGKILL to all of its processes) must give typed 503s with
Retry-After, never a hang nor a 504: the test's profile sets `unavailable_after_s` to a few seconds, after
which the ingress answers 503 at once for a stage with no running replica (`deployments/availability.py`).
Once a worker node offering `sam3_model` is back, the model pool runs there again and requests succeed.
"""

from __future__ import annotations

import signal
import time

import pytest
import yaml

from client import Sam3HttpClient
from client.errors import Sam3Error, ServiceUnavailableError
from sam3_serve_core.checkpoint import load_sam3
from sam3_serve_core.pipeline import Sam3Pipeline
from tests.answers import assert_close_answer, expect
from tests.conftest import random_image
from tests.ray_cluster import Cluster
from tools.launch import cpu_config
from tools.profiles import MODEL_POOL, with_model_resource

MODEL_RESOURCE = "sam3_model"
UNAVAILABLE_AFTER_S = 5
CALL_TIMEOUT_S = 90  # far above the time the cluster takes to see the node gone; a call that takes it is a hang
IMAGE = random_image(72, 96, seed=5)
PROMPTS = [{"text": "a red car"}, {"boxes": [[8, 10, 60, 50]], "labels": [1]}, {"points": [[40, 30]], "labels": [1]}]

pytestmark = pytest.mark.timeout(900)


def two_node_config(checkpoint: str, port: int) -> dict:
    config = with_model_resource(cpu_config(checkpoint, port), MODEL_RESOURCE)
    config["proxy_location"] = "HeadOnly"
    application = config["applications"][0]
    application["args"]["unavailable_after_s"] = UNAVAILABLE_AFTER_S
    (model_pool,) = [d for d in application["deployments"] if d["name"] == MODEL_POOL]
    model_pool["ray_actor_options"]["num_cpus"] = 0
    return config


def add_model_node(cluster: Cluster):
    return cluster.add_worker(num_cpus=0, resources={MODEL_RESOURCE: 1})


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny112_dir):
    tmp_path = tmp_path_factory.mktemp("two-nodes")
    cluster = Cluster(tmp_path, num_cpus=4)
    try:
        add_model_node(cluster)
        config_path = tmp_path / "sam3-two-nodes.yaml"
        config_path.write_text(yaml.safe_dump(two_node_config(str(tiny112_dir), cluster.http_port), sort_keys=False))
        cluster.serve_deploy(config_path)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def url(cluster) -> str:
    return f"http://127.0.0.1:{cluster.http_port}"


def node_ids(cluster: Cluster) -> tuple[str, set[str]]:
    """The head's node id and the ids of the other ALIVE nodes."""
    nodes = cluster.alive_nodes()
    (head,) = [node["node_id"] for node in nodes if node["is_head_node"]]
    return head, {node["node_id"] for node in nodes if not node["is_head_node"]}


def test_the_model_pool_runs_on_the_worker_node_and_everything_else_on_the_head(cluster, url, tiny112_dir):
    head, workers = node_ids(cluster)
    assert len(workers) == 1
    placed = cluster.replica_nodes()
    assert placed[MODEL_POOL] == workers, placed
    assert {name: nodes for name, nodes in placed.items() if name != MODEL_POOL} == {
        "Sam3Ingress": {head}, "Sam3Preprocessor": {head}, "Sam3Postprocessor": {head}
    }  # fmt: skip
    pipeline = Sam3Pipeline(load_sam3(str(tiny112_dir)))
    with Sam3HttpClient(url, timeout=60) as client:
        for prompt in PROMPTS:
            expected = expect(pipeline, IMAGE, **prompt)
            assert expected.at_threshold().union_mask.any(), "an empty expected mask would say little"
            # The first request sends the bytes, the next two IMAGE's `image_id` (the cached path). The
            # service, whose replica caches what earlier batches computed, is held to the in-process answer
            # within the bounds (tests/answers.py).
            assert_close_answer(client.run(IMAGE, **prompt), expected)


def call(client: Sam3HttpClient) -> tuple[float, Sam3Error | None]:
    """How long one request took, and its typed error (None: answered)."""
    started = time.monotonic()
    try:
        mask = client.run(IMAGE, **PROMPTS[0])
    except Sam3Error as error:
        return time.monotonic() - started, error
    assert mask.shape == IMAGE.shape[:2]
    return time.monotonic() - started, None


def test_a_lost_worker_node_gives_503s_and_requests_succeed_once_it_is_back(cluster, url):
    worker = cluster.workers[-1]
    killed_at = time.monotonic()
    worker.stop(signal.SIGKILL)
    outcomes: list[tuple[float, float, Sam3Error | None]] = []
    with Sam3HttpClient(url, timeout=CALL_TIMEOUT_S, retries=0) as client:
        # Until three 503s in a row: requests sent while the cluster has not yet seen the node gone either
        # still reach the dying replica or wait; then every request gets its 503 at once.
        while len(outcomes) < 3 or any(error is None for _, _, error in outcomes[-3:]):
            assert time.monotonic() - killed_at < 180, f"no run of 503s within 180 s of the kill: {outcomes}"
            took, error = call(client)
            outcomes.append((time.monotonic() - killed_at, took, error))
    summary = [(round(at, 1), round(took, 2), type(error).__name__ if error else "ok") for at, took, error in outcomes]
    print("after the kill (s since the kill, s taken, outcome):", summary)
    errors = [error for _, _, error in outcomes if error is not None]
    assert all(type(error) is ServiceUnavailableError for error in errors), errors
    assert all(error.http_status == 503 and error.retry_after_s == 1 for error in errors)
    assert all(took < 3 for _, took, _ in outcomes[-2:]), "once the stage is known lost, 503s come at once"

    recovered_at = time.monotonic()
    add_model_node(cluster)
    with Sam3HttpClient(url, timeout=CALL_TIMEOUT_S, retries=8, backoff_s=0.5, max_backoff_s=4.0) as client:
        while (error := call(client)[1]) is not None:
            assert type(error) is ServiceUnavailableError, error
            assert time.monotonic() - recovered_at < 300, "requests still fail 300 s after the node came back"
        print(f"answered again {time.monotonic() - recovered_at:.1f} s after the worker node was started again")
        for prompt in PROMPTS:
            assert client.run(IMAGE, **prompt).shape == IMAGE.shape[:2]
    head, workers = node_ids(cluster)
    assert cluster.replica_nodes()[MODEL_POOL] == workers and worker.node_id not in workers
