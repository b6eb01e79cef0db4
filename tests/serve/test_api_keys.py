"""API keys that rotate, on the real application: callers are never refused while a key is replaced, a removed
key is refused within `api_key_refresh_s`, and no key shows in an error body, the metrics or any log.

The keys are in a file, as a mounted Secret is, with a short refresh interval so that the test is quick.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
import urllib.request
from pathlib import Path

import httpx
import pytest
import ray
from ray import serve

from client.images import encode_image
from client.protocol import SegmentRequest
from tests.conftest import random_image
from tests.serve.app_runner import APP_NAME, cpu_config, serve_run

REFRESH_S = 1.0
# Fresh each run, so that finding one in a log can only mean this run leaked it.
OLD, NEW, WRONG = (f"{name}-{secrets.token_hex(16)}" for name in ("old", "new", "wrong"))
BODY = SegmentRequest(image=encode_image(random_image(48, 64, seed=9), timeout=None), text="cat").model_dump_json()


def write_keys(path: Path, *keys: str) -> float:
    """Replace the file at once, as Kubernetes swaps a Secret; the time by which the new keys are in place."""
    staged = path.with_name(path.name + ".new")
    staged.write_text("".join(key + "\n" for key in keys))
    os.replace(staged, path)
    return time.monotonic()


@pytest.fixture(scope="module")
def key_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("api-keys") / "api-keys"
    write_keys(path, OLD)
    return path


@pytest.fixture(scope="module")
def app_url(ray_address, serve_port, tiny112_dir, key_file, tmp_path_factory):
    config = cpu_config(str(tiny112_dir), serve_port)
    config["applications"][0]["args"].update(api_key_file=str(key_file), api_key_refresh_s=REFRESH_S)
    yield serve_run(config, tmp_path_factory.mktemp("serve") / "config.yaml", ray_address)
    serve.delete(APP_NAME)


def segment(client: httpx.Client, authorization: str | None) -> httpx.Response:
    headers = {"content-type": "application/json", **({"authorization": authorization} if authorization else {})}
    return client.post("/v1/segment", content=BODY, headers=headers)


class Caller(threading.Thread):
    """Sends requests one after another with its current key; records (sent, answered, key, status) of each."""

    def __init__(self, app_url: str, key: str) -> None:
        super().__init__(daemon=True)
        self.app_url, self.key, self.stop = app_url, key, threading.Event()
        self.answers: list[tuple[float, float, str, int]] = []

    def run(self) -> None:
        with httpx.Client(base_url=self.app_url, timeout=60) as client:
            while not self.stop.is_set():
                key, sent = self.key, time.monotonic()
                status = segment(client, f"Bearer {key}").status_code
                self.answers.append((sent, time.monotonic(), key, status))

    def wait_for_answer(self, key: str, after: float, timeout_s: float = 60) -> None:
        """Until a request with `key` sent after `after` is answered: the caller has moved."""
        deadline = time.monotonic() + timeout_s
        while not any(k == key and sent >= after for sent, _, k, _ in self.answers):
            assert time.monotonic() < deadline, f"no answer with the {key[:3]} key in {timeout_s} s"
            time.sleep(0.05)


def test_keys_rotate_with_no_refused_request(app_url, key_file):
    """The README's procedure: add the new key, wait the refresh interval, move callers, remove the old key.

    `moved` follows it and is never refused. `late` keeps the old key: it is served until the removal, and
    every request it sends `REFRESH_S` after the removal is refused.
    """
    moved, late = Caller(app_url, OLD), Caller(app_url, OLD)
    for caller in (moved, late):
        caller.start()
        caller.wait_for_answer(OLD, after=0)

    added = write_keys(key_file, OLD, NEW)
    time.sleep(REFRESH_S)
    moved.key = NEW
    moved.wait_for_answer(NEW, after=added + REFRESH_S)

    removed = write_keys(key_file, NEW)
    time.sleep(REFRESH_S)
    late.wait_for_answer(OLD, after=removed + REFRESH_S)
    for caller in (moved, late):
        caller.stop.set()
        caller.join(60)

    assert {status for *_, status in moved.answers} == {200}, "a caller that follows the procedure is never refused"
    assert {key for _, _, key, _ in moved.answers} == {OLD, NEW}
    before = [status for _, answered, _, status in late.answers if answered < removed]
    after = [status for sent, _, _, status in late.answers if sent >= removed + REFRESH_S]
    assert before and set(before) == {200}, "the old key is served until it is removed"
    assert after and set(after) == {401}, f"the removed key is refused {REFRESH_S} s after the removal"
    assert {status for *_, status in late.answers} <= {200, 401}


def scrape_metrics() -> str:
    port = ray.nodes()[0]["MetricsExportPort"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        return answer.read().decode()


def session_logs() -> str:
    """Every log file of this Ray session: the replicas', the proxy's, the controller's, the workers'."""
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    return "\n".join(path.read_text(errors="replace") for path in logs.rglob("*") if path.is_file())


def test_keys_never_appear_in_error_bodies_metrics_or_logs(app_url, key_file):
    """Through a rotation (whose re-reads are logged), a served request, and refused ones with every kind of key."""
    with httpx.Client(base_url=app_url, timeout=60) as client:
        for keys in ([OLD, NEW], [NEW]):
            write_keys(key_file, *keys)
            time.sleep(REFRESH_S)
            assert segment(client, f"Bearer {keys[0]}").status_code == 200
        headers = (f"Bearer {WRONG}", f"Bearer {OLD}", NEW, f"Basic {NEW}", None)
        refused = [segment(client, header) for header in headers]
        info = client.get("/v1/info")
    assert [answer.status_code for answer in refused] == [401] * 5
    assert info.status_code == 200 and info.json()["api_key_required"] is True
    for answer in [*refused, info]:
        shown = answer.text + str(answer.headers)
        assert not any(key in shown for key in (OLD, NEW, WRONG)), answer.text

    deadline, metrics = time.monotonic() + 90, ""
    while 'error_code="unauthorized"' not in metrics:
        assert time.monotonic() < deadline, "the refused requests were not counted within 90 s"
        time.sleep(1)
        metrics = scrape_metrics()
    assert not any(key in metrics for key in (OLD, NEW, WRONG))

    deadline, logs = time.monotonic() + 30, ""
    while not ("API keys: 2 read from" in logs and "failed: 401 unauthorized" in logs):
        assert time.monotonic() < deadline, "the ingress did not log the re-reads and the refusals within 30 s"
        time.sleep(0.5)
        logs = session_logs()
    for key in (OLD, NEW, WRONG):
        assert key not in logs, f"the {key[:3]} key is in a log"
