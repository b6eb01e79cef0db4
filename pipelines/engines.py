"""The two engines, as Ray Data callable classes: each takes a batch of (image, prompt) rows and returns
output rows (`pipelines.rows.OUTPUT_SCHEMA`).

`ServiceSegmenter` sends rows to the live Serve application through the handle client, a bounded number
in flight, so a job and online traffic share one autoscaled, batching model pool. `PipelineSegmenter`
loads the model itself and runs the same core code as the model pool (`Sam3Pipeline.answer`), for a
cluster dedicated to the job.

Both report to the job's tally (`pipelines.tally`), for the summary line, whether Ray restarted them and
the rows of each batch as it starts, and the service engine the requests it retried.
"""

from __future__ import annotations

import threading

import pyarrow as pa
from ray.actor import ActorHandle

from client._api import PromptOptions
from client.handle_client import Sam3HandleClient
from deployments.config import AppArgs
from pipelines.rows import segment_rows
from pipelines.tally import report, report_start


class ServiceSegmenter:
    def __init__(
        self,
        app_name: str,
        max_in_flight: int,
        timeout_s: float,
        retries: int,
        options: PromptOptions | None = None,
        tally: ActorHandle | None = None,
    ):
        """Lost or restarting replicas and 503s are retried by the client, `retries` times at most, with
        backoff (at most 10 s apart) within `timeout_s`; a row that still fails is written with its error
        and redone by the next run."""
        self.client = Sam3HandleClient(app_name, timeout=timeout_s, retries=retries, max_backoff_s=10.0)
        self.client.on_retry = self._count_retry
        self.max_in_flight = max_in_flight
        self.timeout_s = timeout_s
        self.options = options
        self.tally = tally
        report_start(tally)
        self._retried = 0
        self._retried_lock = threading.Lock()  # the client retries from its worker threads

    def __call__(self, batch: pa.Table) -> pa.Table:
        report(self.tally, rows_started=batch.num_rows)
        rows = segment_rows(
            batch["image"].to_pylist(),
            batch["prompt"].to_pylist(),
            self._answer,
            timeout_s=self.timeout_s,
            options=self.options,
        )
        with self._retried_lock:
            retried, self._retried = self._retried, 0
        report(self.tally, requests_retried=retried)
        return rows

    def _answer(self, requests):
        return list(self.client.segment_many(requests, concurrency=self.max_in_flight))

    def _count_retry(self, error: Exception) -> None:
        with self._retried_lock:
            self._retried += 1


class PipelineSegmenter:
    def __init__(self, args: AppArgs, options: PromptOptions | None = None, tally: ActorHandle | None = None):
        """The application's own `args` (checkpoint, thresholds, limits), so both engines answer alike."""
        import torch

        from sam3_serve_core.checkpoint import load_sam3, resolve_device
        from sam3_serve_core.pipeline import Sam3Pipeline, warm_up

        if args.torch_threads is not None:
            torch.set_num_threads(args.torch_threads)
        self.pipeline = Sam3Pipeline(
            load_sam3(args.checkpoint, resolve_device(args.device), args.dtype, args.compile, args.compile_regions),
            score_threshold=args.score_threshold,
            mask_chunk_pixels=args.mask_chunk_pixels,
            max_image_pixels=args.max_image_pixels,
            max_prompt_items=args.max_prompt_items,
        )
        if self.pipeline.models.compiled:  # every graph compiled before the first rows, as in a model replica
            warm_up(self.pipeline.runner)
        self.options = options
        self.tally = tally
        report_start(tally)

    def __call__(self, batch: pa.Table) -> pa.Table:
        report(self.tally, rows_started=batch.num_rows)
        return segment_rows(
            batch["image"].to_pylist(),
            batch["prompt"].to_pylist(),
            self.pipeline.answer,
            timeout_s=None,
            options=self.options,
        )
