"""The CPU preprocessor: decode, validate, resize and tokenize, before a request joins a model batch."""

from __future__ import annotations

import asyncio
import time

from ray import serve

from client.protocol import SegmentRequest
from deployments.config import AppArgs
from deployments.core.checkpoint import load_geometry, load_tokenizer
from deployments.core.pipeline import prepare_request
from deployments.core.runner import PreparedItem


@serve.deployment(ray_actor_options={"num_cpus": 1})
class Sam3Preprocessor:
    """Needs the checkpoint's tokenizer and config only, never its weights."""

    def __init__(self, args: AppArgs):
        self.tokenizer = load_tokenizer(args.checkpoint)
        self.geometry = load_geometry(args.checkpoint)
        self.max_image_pixels = args.max_image_pixels
        self.max_prompt_items = args.max_prompt_items

    def _prepare(self, request: SegmentRequest, deadline: float | None) -> PreparedItem:
        started = time.perf_counter()
        item = prepare_request(
            request,
            tokenizer=self.tokenizer,
            geometry=self.geometry,
            max_image_pixels=self.max_image_pixels,
            max_prompt_items=self.max_prompt_items,
            deadline=deadline,
        )
        item.timings_ms["preprocess"] = (time.perf_counter() - started) * 1000
        return item

    async def prepare(self, request: SegmentRequest, deadline: float | None = None) -> PreparedItem:
        """Decoding is CPU-bound: a worker thread keeps the replica's event loop free for new requests."""
        return await asyncio.to_thread(self._prepare, request, deadline)
