"""The deployments' own logic without Ray: API-key checks, per-item errors and out-of-memory handling."""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque

import pytest
import torch

from client.errors import RequestTimeoutError, ServiceUnavailableError
from deployments.config import AppArgs
from deployments.core.runner import PreparedItem
from deployments.ingress import is_authorized, load_api_key
from deployments.model_pool import ModelResult, Sam3ModelPool


def test_api_key_from_file_or_environment(tmp_path, monkeypatch):
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    monkeypatch.setenv("SAM3_API_KEY", "from-env")
    assert load_api_key(AppArgs(api_key_file=str(key_file))) == "from-file"
    assert load_api_key(AppArgs()) == "from-env"
    monkeypatch.delenv("SAM3_API_KEY")
    assert load_api_key(AppArgs()) is None
    assert load_api_key(AppArgs(api_key_env=None)) is None


@pytest.mark.parametrize(
    "header, expected",
    [("Bearer s3cret", True), ("bearer s3cret", True), ("Bearer s3cre", False), ("Bearer", False),
     ("Basic s3cret", False), ("s3cret", False), (None, False), ("Bearer s3cret2", False)],
)
def test_bearer_check(header, expected):
    assert is_authorized(header, "s3cret") is expected
    assert is_authorized(header, None) is True, "no key configured: no check"


class FakeRunner:
    """Fails whole batches of more than `max_ok` items, and any item whose size is in `bad_sizes`."""

    def __init__(self, error: Exception, max_ok: int = 1, bad_sizes=()):
        self.error, self.max_ok, self.bad_sizes, self.calls = error, max_ok, set(bad_sizes), []

    def run(self, items):
        self.calls.append(len(items))
        if len(items) > self.max_ok or any(item.original_size in self.bad_sizes for item in items):
            raise self.error
        return [[f"output for {item.original_size}"] for item in items]


def pool_with(runner) -> Sam3ModelPool:
    pool = object.__new__(Sam3ModelPool.func_or_class)
    pool.runner, pool.batch_sizes = runner, Counter()
    pool._torch_threads, pool._model_threads, pool._model_thread_count = None, deque(), 0
    pool.models = type("Models", (), {"device": torch.device("cpu")})()
    pool.batch_size_metric = type("Metric", (), {"observe": lambda self, value: None})()
    return pool


def item(size, deadline=None) -> PreparedItem:
    return PreparedItem(pixels=None, original_size=size, prompts=[], deadline=deadline)


def test_an_oversized_batch_that_runs_out_of_memory_answers_every_item():
    runner = FakeRunner(torch.OutOfMemoryError("CUDA out of memory"), max_ok=1)
    results = pool_with(runner)._run_items([item((1, 1)), item((2, 2)), item((3, 3))])
    assert [result.original_size for result in results] == [(1, 1), (2, 2), (3, 3)]
    assert all(isinstance(result, ModelResult) for result in results)
    assert runner.calls == [3, 1, 1, 1]


def test_one_bad_item_fails_alone():
    runner = FakeRunner(ValueError("bad item"), max_ok=10, bad_sizes={(2, 2)})
    results = pool_with(runner)._run_items([item((1, 1)), item((2, 2)), item((3, 3))])
    assert isinstance(results[0], ModelResult) and isinstance(results[2], ModelResult)
    assert isinstance(results[1], ValueError)


def test_out_of_memory_on_a_single_item_is_a_retryable_error():
    (result,) = pool_with(FakeRunner(torch.OutOfMemoryError("oom"), max_ok=0))._run_items([item((1, 1))])
    assert isinstance(result, ServiceUnavailableError)


def test_expired_items_are_answered_without_running():
    runner = FakeRunner(ValueError("never"), max_ok=10)
    pool = pool_with(runner)
    batch = [item((1, 1), deadline=time.time() - 1), item((2, 2), deadline=time.time() + 60), item((3, 3))]
    results = asyncio.run(pool._run_batch([(entry, time.perf_counter()) for entry in batch]))
    assert isinstance(results[0], RequestTimeoutError)
    assert [r.original_size for r in results[1:]] == [(2, 2), (3, 3)]
    assert runner.calls == [2]
