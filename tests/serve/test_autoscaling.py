"""Autoscaling is real: sustained load scales the model pool from 1 replica to 2, and it returns to 1.

A test profile of serve_config.yaml with short delays and fractional CPUs; every request sent while the
pool grows and shrinks must succeed, with an answer within the bounds of the in-process pipeline's
(`tests/answers.py`): requests share batches of varying size, and a new replica encodes the image anew.
"""

from __future__ import annotations

import time

import pytest
from ray import serve

from client import Sam3HttpClient
from sam3_serve_core.checkpoint import load_sam3
from sam3_serve_core.pipeline import Sam3Pipeline
from tests.answers import close_answer, expect
from tests.conftest import random_image
from tests.serve.app_runner import APP_NAME, cpu_config, deployment, replica_count, serve_run
from tests.serve.load import LoadGenerator

IMAGE = random_image(90, 130, seed=3)


def wait_for_replicas(count: int, timeout_s: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if replica_count("Sam3ModelPool") == count:
            return time.monotonic() - started
        time.sleep(0.5)
    pytest.fail(f"model pool did not reach {count} replicas in {timeout_s} s: {serve.status()}")


def test_model_pool_scales_up_and_back_down_without_losing_requests(ray_address, serve_port, tiny112_dir, tmp_path):
    config = cpu_config(str(tiny112_dir), serve_port)
    pool = deployment(config, "Sam3ModelPool")
    pool["autoscaling_config"] = {
        "min_replicas": 1,
        "initial_replicas": 1,
        "max_replicas": 2,
        "target_ongoing_requests": 2,
        "upscale_delay_s": 1,
        "downscale_delay_s": 4,
        "metrics_interval_s": 0.5,
        "look_back_period_s": 2,
    }
    pool["user_config"] = {"max_batch_size": 2, "batch_wait_timeout_s": 0.01}
    pool["max_ongoing_requests"] = 8
    expected = expect(Sam3Pipeline(load_sam3(str(tiny112_dir))), IMAGE, text="a red car")
    assert expected.at_threshold().union_mask.any(), "an empty expected mask would make the comparison say little"
    base_url = serve_run(config, tmp_path / "config.yaml", ray_address)
    try:
        assert replica_count("Sam3ModelPool") == 1
        with Sam3HttpClient(base_url, timeout=60) as client:
            # After the first answer the client sends IMAGE's `image_id`: the replica holding its features
            # answers from them, and one that does not answers 404 and the client sends the bytes again.
            # Both paths are meant: each answer is held to the same bounds.
            load = LoadGenerator(lambda: close_answer(client.run(IMAGE, text="a red car"), expected))
            try:
                load.set_concurrency(12)
                up_s = wait_for_replicas(2, timeout_s=120)
                answered_at_peak = load.answered
                load.wait_for_answers(answered_at_peak + 12)  # the load on both replicas for a while
                load.set_concurrency(1)  # light traffic keeps flowing while the pool shrinks
                down_s = wait_for_replicas(1, timeout_s=120)
                load.wait_for_answers(load.answered + 2)  # and after it shrank
            finally:
                load.stop()
        print(
            f"autoscaling: 1 -> 2 replicas in {up_s:.1f} s, back to 1 in {down_s:.1f} s; "
            f"{load.answered} requests answered ({answered_at_peak} by the scale-up), {len(load.failures)} failed"
        )
        assert not load.failures, load.failures[:3]
        assert load.wrong == 0, "a request got a wrong answer"
        assert load.answered >= answered_at_peak + 14
    finally:
        serve.delete(APP_NAME)
