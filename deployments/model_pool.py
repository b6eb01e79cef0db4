"""The SAM 3 model pool: GPU replicas that batch requests dynamically (`deployments.batcher`).

One response per request (Triton style): a batch that fails is retried item by item, so one bad item
fails alone. Batch limits come from `user_config` and change live through `reconfigure`. Each replica
holds up to `max_models_per_replica` checkpoints (Serve model multiplexing): requests for a model are
routed to replicas that hold it, and each model batches on its own, so a batch never mixes models.
Video sessions live on the replicas too (`deployments.video_replica`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import weakref
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor

import torch
from ray import serve

from client.errors import RequestTimeoutError, Sam3Error
from deployments.batcher import ContinuousBatcher
from deployments.config import AppArgs, BatchConfig
from deployments.metrics import ModelPoolMetrics
from deployments.video_replica import VideoReplica
from sam3_serve_core.checkpoint import Sam3Models, load_sam3, resolve_device
from sam3_serve_core.failures import in_place, passing
from sam3_serve_core.messages import ModelResult, PreparedItem
from sam3_serve_core.pipeline import warm_up
from sam3_serve_core.runner import Sam3Runner, run_isolating_failures
from sam3_serve_core.video_tracking import VideoModels

logger = logging.getLogger("ray.serve")


@dataclasses.dataclass
class LoadedModel:
    """One checkpoint in a replica: its weights, its text-encoding cache, and its own batcher."""

    model_id: str
    models: Sam3Models
    runner: Sam3Runner
    batcher: ContinuousBatcher
    video: VideoModels | None = None  # loaded with the model's first video session


@serve.deployment
class Sam3ModelPool(VideoReplica):
    """Every torch call runs on the replica's model threads, one per batch in flight, never elsewhere.

    Each thread that runs torch ops gets its own OpenMP team; two teams on the same cores throttle each
    other's spin-waits, and every parallel op then pays a sleep and a wake-up. Measured in one process on
    2 cores (tiny checkpoint, 2 torch threads): a forward pass took 14 ms on the thread that loaded the
    model and 38-45 ms on a second thread. So loading, warm-up and batches share one thread, and a second
    one starts only when `max_concurrent_batches` lets two batches run at once.
    """

    async def __init__(self, args: AppArgs):
        self._args = args
        self._torch_threads = args.torch_threads
        self._model_threads: deque[ThreadPoolExecutor] = deque()
        self._model_thread_count = 0
        self._batch_config = BatchConfig()
        # Every model this replica holds, without keeping one alive once multiplexing has unloaded it.
        self._held: weakref.WeakValueDictionary[str, LoadedModel] = weakref.WeakValueDictionary()
        self.batch_sizes: Counter[int] = Counter()
        self.metrics = ModelPoolMetrics()
        self._init_video()

        async def load_model(model_id: str) -> LoadedModel:
            return await self._on_model_thread(self._load_on_model_thread, model_id)

        # Wrapped here rather than decorated, so the bound comes from the application's args.
        self._loaded_model = serve.multiplexed(max_num_models_per_replica=args.max_models_per_replica)(load_model)
        # The default model loads at start, through multiplexing: a replica is ready only once it can answer,
        # and request routers know from the start which replicas hold it.
        default = await self._loaded_model(args.default_model)
        logger.info(
            "model pool: %s on %s, %s attention, %d torch threads",
            default.models.dtype,
            default.models.device,
            default.models.detector.config._attn_implementation,
            await self._on_model_thread(torch.get_num_threads),
        )

    def _new_model_thread(self) -> ThreadPoolExecutor:
        self._model_thread_count += 1
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sam3-model-{self._model_thread_count}")
        if self._torch_threads is not None:
            executor.submit(torch.set_num_threads, self._torch_threads).result()
        return executor

    async def _on_model_thread(self, function, *args):
        """`function(*args)` on an idle model thread; the most recently used goes first, so one batch at a
        time always runs on the same thread. Threads never outnumber the work in flight."""
        executor = self._model_threads.popleft() if self._model_threads else self._new_model_thread()
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, function, *args)
        finally:
            self._model_threads.appendleft(executor)

    def _load_on_model_thread(self, model_id: str) -> LoadedModel:
        args = self._args
        started = time.perf_counter()
        models = load_sam3(
            args.models[model_id], resolve_device(args.device), args.dtype, args.compile, args.compile_regions
        )
        runner = Sam3Runner(
            models,
            args.score_threshold,
            text_cache_size=args.text_cache_size,
            vision_cache_bytes=args.vision_cache_bytes,
            mask_chunk_pixels=args.mask_chunk_pixels,
        )
        batcher = ContinuousBatcher(
            lambda queued: self._run_batch(model_id, runner, queued), max_batch_size=self._batch_config.max_batch_size
        )
        self._configure(batcher)
        warm_up_s = warm_up(runner)
        image_bytes = runner.image_feature_bytes
        logger.info(
            "model %s (%s) ready in %.1f s, of which warm-up %s s%s; one image's vision features take %.1f MB "
            "(%d fit in vision_cache_bytes)",
            model_id,
            args.models[model_id],
            time.perf_counter() - started,
            " + ".join(f"{seconds:.1f}" for seconds in warm_up_s),
            " (compiling the layers)" if models.compiled else "",
            image_bytes / 1e6,
            args.vision_cache_bytes // image_bytes,
        )
        loaded = LoadedModel(model_id, models, runner, batcher)
        self._held[model_id] = loaded
        return loaded

    def _configure(self, batcher: ContinuousBatcher) -> None:
        config = self._batch_config
        batcher.configure(config.max_batch_size, config.batch_wait_timeout_s, config.max_concurrent_batches)

    def reconfigure(self, user_config: dict) -> None:
        self._batch_config = BatchConfig.model_validate(user_config)
        for loaded in self._loaded_models():
            self._configure(loaded.batcher)
        logger.info("model pool batching: %s", self._batch_config)

    def _loaded_models(self) -> list[LoadedModel]:
        return list(self._held.values())

    async def run(self, item: PreparedItem | Sam3Error, image_key: str | None = None) -> ModelResult | Sam3Error:
        """One request in, one result or one error out, whatever else shared its batch.

        A typed error (an image no longer cached, a deadline passed, the device out of memory) is returned,
        not raised, as the preprocessor's are: Serve would log each raised one with a traceback.

        The model is the request's multiplexed model id (the ingress sets it on the handle). `image_key` is
        `item.image_key` again, for the request router (`deployments.routing`), which sees the call's
        arguments but not the item's contents. A request that names its image by id alone, when this replica
        does not hold that image's features, is answered at once: the caller must send the image.
        """
        if isinstance(item, Sam3Error):
            return item
        loaded = await self._loaded_model(serve.get_multiplexed_model_id() or self._args.default_model)
        try:
            loaded.runner.check_image(item)  # before it joins a batch, which it would fail
        except Sam3Error as error:
            return error
        result = await loaded.batcher.submit((item, time.perf_counter()))
        if isinstance(result, Exception) and not isinstance(result, Sam3Error):
            raise result
        return result

    async def _run_batch(
        self, model_id: str, runner: Sam3Runner, queued: list[tuple[PreparedItem, float]]
    ) -> list[ModelResult | Exception]:
        """Items whose caller stopped waiting while they queued are answered with a timeout, not run."""
        started, now = time.perf_counter(), time.time()
        slots = [
            RequestTimeoutError("the request's time budget ran out before the model ran it")
            if item.deadline is not None and item.deadline <= now
            else item
            for item, _ in queued
        ]
        live = passing(slots)
        answers = in_place(slots, await self._run_live(model_id, runner, live) if live else [])
        model_ms = (time.perf_counter() - started) * 1000
        for (_, enqueued), answer in zip(queued, answers):
            if isinstance(answer, ModelResult):
                answer.timings_ms.update(queue=(started - enqueued) * 1000, model=model_ms)
        return answers

    async def _run_live(self, model_id: str, runner: Sam3Runner, items: list[PreparedItem]) -> list[ModelResult | Exception]:
        self.batch_sizes[len(items)] += 1
        self.metrics.observe_batch(model_id, items)
        results = await self._on_model_thread(self._run_items, runner, items)
        if runner.vision_cache is not None:
            self.metrics.observe_cache(model_id, runner.vision_cache)
        return results

    @staticmethod
    def _run_items(runner: Sam3Runner, items: list[PreparedItem]) -> list[ModelResult | Exception]:
        outputs = run_isolating_failures(runner, items, runner.models.device)
        return [
            result
            if isinstance(result, Exception)
            else ModelResult(result, dict(item.timings_ms), item.image_key)
            for item, result in zip(items, outputs)
        ]

    def stats(self) -> dict:
        """Cumulative batch sizes and busy seconds (time with a batch running), and the video sessions held, for
        benchmarks and operators."""
        loaded = self._loaded_models()
        return {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "batch_sizes": dict(self.batch_sizes),
            "busy_s": sum(model.batcher.busy_s() for model in loaded),
            "queued": sum(model.batcher.queued() for model in loaded),
            "models": sorted(model.model_id for model in loaded),
            "vision_cache": {
                model.model_id: dataclasses.asdict(model.runner.vision_cache.stats())
                for model in loaded
                if model.runner.vision_cache is not None
            },
            "video_sessions": self.video_sessions_held(),
        }
