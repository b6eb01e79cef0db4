"""The SAM 3 model pool: GPU replicas that batch requests dynamically (`deployments.batcher`).

One response per request (Triton style): a batch that fails is retried item by item, so one bad item
fails alone. Batch limits come from `user_config` and change live through `reconfigure`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from ray import serve
from ray.serve.metrics import Histogram

from client.errors import RequestTimeoutError
from deployments.batcher import ContinuousBatcher
from deployments.config import AppArgs, BatchConfig
from deployments.core.checkpoint import load_sam3, resolve_device
from deployments.core.pipeline import prepare_item
from deployments.core.runner import PreparedItem, RawOutput, Sam3Runner, run_isolating_failures

logger = logging.getLogger("ray.serve")


@dataclass
class ModelResult:
    """Raw outputs for one request, with what the postprocessor needs to finish it."""

    original_size: tuple[int, int]
    outputs: list[RawOutput]
    timings_ms: dict[str, float]


@serve.deployment(
    ray_actor_options={"num_gpus": 1},
    max_ongoing_requests=32,
    autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8},
)
class Sam3ModelPool:
    """Every torch call runs on the replica's model threads, one per batch in flight, never elsewhere.

    Each thread that runs torch ops gets its own OpenMP team; two teams on the same cores throttle each
    other's spin-waits, and every parallel op then pays a sleep and a wake-up. Measured in one process on
    2 cores (tiny checkpoint, 2 torch threads): a forward pass took 14 ms on the thread that loaded the
    model and 38-45 ms on a second thread. So loading, warm-up and batches share one thread, and a second
    one starts only when `max_concurrent_batches` lets two batches run at once.
    """

    def __init__(self, args: AppArgs):
        self._torch_threads = args.torch_threads
        self._model_threads: deque[ThreadPoolExecutor] = deque()
        self._model_thread_count = 0
        first = self._new_model_thread()
        self.models = first.submit(load_sam3, args.checkpoint, resolve_device(args.device), args.dtype).result()
        self.runner = Sam3Runner(self.models, args.score_threshold, text_cache_size=args.text_cache_size)
        self.batch_sizes: Counter[int] = Counter()
        self.batch_size_metric = Histogram(
            "sam3_model_batch_size",
            description="Requests per model batch.",
            boundaries=[1, 2, 4, 8, 16, 32, 64],
        )
        self.batcher = ContinuousBatcher(self._run_batch, max_batch_size=BatchConfig().max_batch_size)
        first.submit(self._warm_up).result()
        self._model_threads.append(first)
        logger.info(
            "model pool: %s on %s, %s attention, %d torch threads",
            self.models.dtype,
            self.models.device,
            self.models.detector.config._attn_implementation,
            first.submit(torch.get_num_threads).result(),
        )

    def _new_model_thread(self) -> ThreadPoolExecutor:
        self._model_thread_count += 1
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sam3-model-{self._model_thread_count}")
        if self._torch_threads is not None:
            executor.submit(torch.set_num_threads, self._torch_threads).result()
        return executor

    def _warm_up(self) -> None:
        """One forward pass of each head at start, so the first request does not pay for it."""
        size = self.models.geometry.image_size
        blank = np.zeros((size, size, 3), dtype=np.uint8)
        common = {"tokenizer": self.models.tokenizer, "geometry": self.models.geometry}
        self.runner.run([prepare_item(blank, text="warm up", **common), prepare_item(blank, points=[[1, 1]], labels=[1], **common)])

    def reconfigure(self, user_config: dict) -> None:
        config = BatchConfig.model_validate(user_config)
        self.batcher.configure(config.max_batch_size, config.batch_wait_timeout_s, config.max_concurrent_batches)
        logger.info("model pool batching: %s", config)

    async def run(self, item: PreparedItem) -> ModelResult:
        """One request in, one result or one error out, whatever else shared its batch."""
        result = await self.batcher.submit((item, time.perf_counter()))
        if isinstance(result, Exception):
            raise result
        return result

    async def _run_batch(self, queued: list[tuple[PreparedItem, float]]) -> list[ModelResult | Exception]:
        """Items whose caller stopped waiting while they queued are answered with a timeout, not run."""
        started, now = time.perf_counter(), time.time()
        expired = [item.deadline is not None and item.deadline <= now for item, _ in queued]
        live = [item for (item, _), gone in zip(queued, expired) if not gone]
        results = iter(await self._run_live(live) if live else [])
        model_ms = (time.perf_counter() - started) * 1000
        answers = []
        for (item, enqueued), gone in zip(queued, expired):
            if gone:
                answers.append(RequestTimeoutError("the request's time budget ran out before the model ran it"))
                continue
            result = next(results)
            if isinstance(result, ModelResult):
                result.timings_ms.update(queue=(started - enqueued) * 1000, model=model_ms)
            answers.append(result)
        return answers

    async def _run_live(self, items: list[PreparedItem]) -> list[ModelResult | Exception]:
        self.batch_sizes[len(items)] += 1
        self.batch_size_metric.observe(len(items))
        # The batcher keeps at most `max_concurrent_batches` here, so threads never outnumber batches in flight;
        # the most recently used thread goes first, so one batch at a time always runs on the same thread.
        executor = self._model_threads.popleft() if self._model_threads else self._new_model_thread()
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, self._run_items, items)
        finally:
            self._model_threads.appendleft(executor)

    def _run_items(self, items: list[PreparedItem]) -> list[ModelResult | Exception]:
        outputs = run_isolating_failures(self.runner, items, self.models.device)
        return [
            result if isinstance(result, Exception) else ModelResult(item.original_size, result, dict(item.timings_ms))
            for item, result in zip(items, outputs)
        ]

    def batch_size_counts(self) -> dict[int, int]:
        """How many batches of each size this replica ran (for tests and operators)."""
        return dict(self.batch_sizes)

    def stats(self) -> dict:
        """Cumulative batch sizes and busy seconds (time with a batch running), for benchmarks and operators."""
        return {"batch_sizes": dict(self.batch_sizes), "busy_s": self.batcher.busy_s(), "queued": self.batcher.queued()}
