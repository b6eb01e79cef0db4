"""The deployments' own logic without Ray: model ids, per-item errors and out-of-memory handling."""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque

import pytest
import torch

from pydantic import ValidationError

from client.errors import InvalidImageError, ModelNotFoundError, RequestTimeoutError, ServiceUnavailableError
from deployments.config import AppArgs, set_default_checkpoint
from deployments.metrics import stage_latencies
from deployments.model_pool import Sam3ModelPool
from sam3_serve_core.messages import ModelResult, PreparedItem


def test_model_ids_resolve_to_served_models_or_a_typed_404():
    args = AppArgs(models={"sam3": "facebook/sam3", "tuned": "/models/tuned"}, default_model="sam3")
    assert args.model_id_for(None) == "sam3"
    assert args.model_id_for("tuned") == "tuned"
    assert args.checkpoint == "facebook/sam3"
    with pytest.raises(ModelNotFoundError, match="'sam2'.*'sam3', 'tuned'"):
        args.model_id_for("sam2")


def test_the_default_model_must_be_served():
    with pytest.raises(ValidationError, match="default_model 'other'"):
        AppArgs(models={"sam3": "facebook/sam3"}, default_model="other")


@pytest.mark.parametrize("setting", ["auto", True, False])
def test_compile_is_auto_true_or_false(setting):
    assert AppArgs(compile=setting).compile == setting


def test_compile_refuses_other_words():
    with pytest.raises(ValidationError, match="compile"):
        AppArgs(compile="sometimes")


def test_compile_regions_are_the_layer_stacks_the_model_has():
    assert AppArgs(compile_regions=["vision"]).compile_regions == ("vision",)
    with pytest.raises(ValidationError, match="compile_regions"):
        AppArgs(compile_regions=["vision", "mask_decoder"])
    with pytest.raises(ValidationError, match="compile_regions"):
        AppArgs(compile_regions=[])


def test_a_profile_checkpoint_replaces_the_default_models_only():
    args = {"models": {"sam3": "facebook/sam3", "tuned": "/models/tuned"}, "default_model": "sam3"}
    set_default_checkpoint(args, "/tmp/tiny")
    assert args["models"] == {"sam3": "/tmp/tiny", "tuned": "/models/tuned"}
    bare: dict = {}
    set_default_checkpoint(bare, "/tmp/tiny")
    assert AppArgs(**bare).checkpoint == "/tmp/tiny"


def test_stage_latencies_keep_the_known_stages():
    timings = {"preprocess": 1.0, "queue": 2.0, "model": 3.0, "postprocess": 4.0, "total": 11.0, "other": 5.0}
    assert stage_latencies(timings) == {"preprocess": 1.0, "queue": 2.0, "model": 3.0, "postprocess": 4.0, "total": 11.0}
    assert stage_latencies({"model": 3.0}) == {"model": 3.0}


class FakeRunner:
    """Fails whole batches of more than `max_ok` items, and any item whose size is in `bad_sizes`."""

    def __init__(self, error: Exception, max_ok: int = 1, bad_sizes=()):
        self.error, self.max_ok, self.bad_sizes, self.calls = error, max_ok, set(bad_sizes), []
        self.models = type("Models", (), {"device": torch.device("cpu")})()
        self.vision_cache = None

    def run(self, items):
        self.calls.append(len(items))
        if len(items) > self.max_ok or any(item.original_size in self.bad_sizes for item in items):
            raise self.error
        return [f"answer for {item.original_size}" for item in items]


def pool_with(runner) -> Sam3ModelPool:
    pool = object.__new__(Sam3ModelPool.func_or_class)
    pool.batch_sizes = Counter()
    pool._torch_threads, pool._model_threads, pool._model_thread_count = None, deque(), 0
    pool.metrics = type("Metrics", (), {"observe_batch": lambda self, model_id, items: None})()
    return pool


def item(size, deadline=None) -> PreparedItem:
    return PreparedItem(pixels=None, original_size=size, prompts=[], deadline=deadline)


def test_an_oversized_batch_that_runs_out_of_memory_answers_every_item():
    runner = FakeRunner(torch.OutOfMemoryError("CUDA out of memory"), max_ok=1)
    results = pool_with(runner)._run_items(runner, [item((1, 1)), item((2, 2)), item((3, 3))])
    assert [result.segmentation for result in results] == [f"answer for {size}" for size in ((1, 1), (2, 2), (3, 3))]
    assert all(isinstance(result, ModelResult) for result in results)
    assert runner.calls == [3, 1, 1, 1]


def test_one_bad_item_fails_alone():
    runner = FakeRunner(ValueError("bad item"), max_ok=10, bad_sizes={(2, 2)})
    results = pool_with(runner)._run_items(runner, [item((1, 1)), item((2, 2)), item((3, 3))])
    assert isinstance(results[0], ModelResult) and isinstance(results[2], ModelResult)
    assert isinstance(results[1], ValueError)


def test_out_of_memory_on_a_single_item_is_a_retryable_error():
    runner = FakeRunner(torch.OutOfMemoryError("oom"), max_ok=0)
    (result,) = pool_with(runner)._run_items(runner, [item((1, 1))])
    assert isinstance(result, ServiceUnavailableError)


def test_expired_items_are_answered_without_running():
    runner = FakeRunner(ValueError("never"), max_ok=10)
    pool = pool_with(runner)
    batch = [item((1, 1), deadline=time.time() - 1), item((2, 2), deadline=time.time() + 60), item((3, 3))]
    results = asyncio.run(pool._run_batch("sam3", runner, [(entry, time.perf_counter()) for entry in batch]))
    assert isinstance(results[0], RequestTimeoutError)
    assert [r.segmentation for r in results[1:]] == ["answer for (2, 2)", "answer for (3, 3)"]
    assert runner.calls == [2]


def test_a_request_the_preprocessor_refused_passes_through_the_pool_untouched():
    """Without the vision-feature cache the ingress hands the preprocessor's response straight to the model pool,
    so a refusal arrives here: it goes back as it came, with no model looked up and no batch joined."""
    pool = pool_with(FakeRunner(ValueError("never"), max_ok=10))
    refusal = InvalidImageError("cannot decode the image")
    assert asyncio.run(pool.run(refusal)) is refusal
    assert pool.batch_sizes == Counter()
