"""Ready means ready: a checkpoint that cannot load gives its cause in readiness and in every 503.

Each case deploys the CPU profile on a checkpoint that cannot load, as a user on a machine that cannot reach
the model hub would. The ingress starts; the preprocessor and model pool cannot. Serve records their
constructor's exception in the deployment status after the first failed start, the ingress reads it within
a second, and from then on `/v1/ready` answers 503 with the cause, `/v1/health` answers 200 with
`ready: false` and the cause, and a request gets the same 503 at once, never after a wait.

The stated time is the first failed start plus a second: on this machine a missing directory or one that is
not a SAM 3 checkpoint fails in the time the replica takes to import its packages, a hub name after the
hub client's own retries (about 30 s). `CAUSE_WITHIN_S` bounds both with room for a loaded machine.
"""

from __future__ import annotations

import time

import httpx
import pytest
from ray import serve

from client import Sam3HttpClient
from client.images import encode_image
from client.protocol import HEALTH_PATH, READY_PATH, SEGMENT_PATH, SegmentRequest
from tests.conftest import random_image
from tests.serve.app_runner import APP_NAME, cpu_config, serve_start

CAUSE_WITHIN_S = 240
STAGES_THAT_LOAD_THE_CHECKPOINT = ("Sam3ModelPool", "Sam3Preprocessor")

pytestmark = pytest.mark.timeout(600)


def not_a_sam3_directory(tmp_path) -> str:
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    return str(tmp_path)


CASES = {
    "unreachable hub name": (lambda tmp_path: "facebook/sam3", "could not load 'facebook/sam3' from the Hugging Face hub"),
    "not a SAM 3 directory": (not_a_sam3_directory, "is not a SAM 3 checkpoint: its config.json says model_type 'bert'"),
    "missing directory": (lambda tmp_path: str(tmp_path / "no-such-checkpoint"), "does not exist"),
}


def wait_for_cause(base_url: str, cause: str) -> httpx.Response:
    """`/v1/ready` once it gives the cause: the ingress may not answer yet, then says the stages are starting."""
    deadline = time.monotonic() + CAUSE_WITHIN_S
    last = None
    while time.monotonic() < deadline:
        try:
            last = httpx.get(base_url + READY_PATH, timeout=10)
        except httpx.TransportError:
            last = None
        if last is not None and last.status_code == 503 and cause in last.text:
            return last
        time.sleep(1)
    raise AssertionError(f"readiness did not give {cause!r} within {CAUSE_WITHIN_S} s; last answer: {last and last.text}")


@pytest.mark.parametrize("case", list(CASES))
def test_a_checkpoint_that_cannot_load_gives_its_cause_in_readiness_and_in_the_503(
    case, ray_address, serve_port, tmp_path
):
    make_checkpoint, cause = CASES[case]
    base_url = serve_start(cpu_config(make_checkpoint(tmp_path), serve_port), tmp_path / "config.yaml", ray_address)
    try:
        ready = wait_for_cause(base_url, cause)
        error = ready.json()["error"]
        assert error["code"] == "unavailable" and ready.headers["retry-after"]
        assert all(stage in error["message"] for stage in STAGES_THAT_LOAD_THE_CHECKPOINT), error["message"]
        assert "CheckpointUnavailableError" in error["message"]

        health = httpx.get(base_url + HEALTH_PATH, timeout=10)
        assert health.status_code == 200, "liveness holds: the ingress itself is up"
        assert health.json()["ready"] is False and cause in health.json()["reason"]
        with Sam3HttpClient(base_url, retries=0) as client:
            assert client.health() and not client.ready()

        request = SegmentRequest(image=encode_image(random_image(40, 48, seed=1), timeout=None), text="cat")
        answer = httpx.post(
            base_url + SEGMENT_PATH,
            content=request.model_dump_json(),
            headers={"content-type": "application/json"},
            timeout=120,
        )
        assert answer.status_code == 503, answer.text
        assert cause in answer.json()["error"]["message"] and answer.headers["retry-after"]
        assert answer.json()["error"]["request_id"]
    finally:
        serve.delete(APP_NAME)
