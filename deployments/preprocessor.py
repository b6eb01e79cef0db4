"""The CPU preprocessor: decode, validate, resize and tokenize, before a request joins a model batch."""

from __future__ import annotations

import asyncio
import time

from ray import serve

from client.errors import Sam3Error
from client.protocol import SegmentRequest
from deployments.config import AppArgs
from sam3_serve_core.checkpoint import ModelGeometry, load_geometry, load_tokenizer
from sam3_serve_core.messages import PreparedItem
from sam3_serve_core.pipeline import prepare_request


@serve.deployment
class Sam3Preprocessor:
    """Needs each checkpoint's tokenizer and config only, never its weights, so it holds every model's."""

    def __init__(self, args: AppArgs):
        # An image's id names its cached features: without a cache, answers carry none and requests no routing key.
        self.checkpoints = args.models if args.vision_cache_bytes > 0 else {}
        self.tokenizers = {model_id: load_tokenizer(checkpoint) for model_id, checkpoint in args.models.items()}
        self.geometries: dict[str, ModelGeometry] = {
            model_id: load_geometry(checkpoint) for model_id, checkpoint in args.models.items()
        }
        self.max_image_pixels = args.max_image_pixels
        self.max_prompt_items = args.max_prompt_items

    def image_sizes(self) -> dict[str, int]:
        """Each model's input resolution, from its checkpoint's config (for `/v1/info`)."""
        return {model_id: geometry.image_size for model_id, geometry in self.geometries.items()}

    def _prepare(self, request: SegmentRequest, model_id: str, deadline: float | None) -> PreparedItem:
        started = time.perf_counter()
        item = prepare_request(
            request,
            tokenizer=self.tokenizers[model_id],
            geometry=self.geometries[model_id],
            checkpoint=self.checkpoints.get(model_id),
            max_image_pixels=self.max_image_pixels,
            max_prompt_items=self.max_prompt_items,
            deadline=deadline,
        )
        item.timings_ms["preprocess"] = (time.perf_counter() - started) * 1000
        return item

    async def prepare(
        self, request: SegmentRequest, model_id: str, deadline: float | None = None
    ) -> PreparedItem | Sam3Error:
        """Decoding is CPU-bound: a worker thread keeps the replica's event loop free for new requests.

        `model_id` is the one the ingress resolved (a served one), whose tokenizer and geometry apply. A request
        refused with a typed error (an undecodable image, a bad prompt) gets it returned, not raised: Serve logs
        an exception raised out of a replica method with its traceback, and a bad request is expected traffic,
        which the ingress logs in one line."""
        try:
            return await asyncio.to_thread(self._prepare, request, model_id, deadline)
        except Sam3Error as error:
            return error
