"""The CPU postprocessor: the model replica's finished answer (bit-packed masks) in the wire format (COCO RLE, and
polygons when asked)."""

from __future__ import annotations

import asyncio
import time

from ray import serve

from client.errors import Sam3Error
from client.protocol import PromptType, SegmentResponse
from deployments.config import AppArgs
from sam3_serve_core.messages import ModelResult
from sam3_serve_core.postprocess import encode_segmentation, to_response


@serve.deployment
class Sam3Postprocessor:
    def __init__(self, args: AppArgs):
        self.mask_chunk_pixels = args.mask_chunk_pixels

    def _finish(self, result: ModelResult, prompt_type: PromptType, polygon_tolerance: float | None) -> SegmentResponse:
        started = time.perf_counter()
        segmentation = encode_segmentation(result.segmentation, self.mask_chunk_pixels, polygon_tolerance)
        timings_ms = {**result.timings_ms, "postprocess": (time.perf_counter() - started) * 1000}
        return to_response(segmentation, prompt_type, timings_ms, image_id=result.image_key)

    async def finish(
        self, result: ModelResult | Sam3Error, prompt_type: PromptType, polygon_tolerance: float | None = None
    ) -> SegmentResponse | Sam3Error:
        """RLE encoding (and outlining, with a `polygon_tolerance`) is CPU-bound: run it off the replica's event
        loop. The model pool's typed error for the request is passed on as it came."""
        if isinstance(result, Sam3Error):
            return result
        return await asyncio.to_thread(self._finish, result, prompt_type, polygon_tolerance)
