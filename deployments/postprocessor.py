"""The CPU postprocessor: sorted instances, pixel boxes, full-size masks and their union, as the wire format."""

from __future__ import annotations

import asyncio
import time

from ray import serve

from client.protocol import PromptType, SegmentResponse
from deployments.config import AppArgs
from deployments.core.postprocess import encode_segmentation, to_response
from deployments.model_pool import ModelResult


@serve.deployment(ray_actor_options={"num_cpus": 1})
class Sam3Postprocessor:
    def __init__(self, args: AppArgs):
        self.mask_chunk_pixels = args.mask_chunk_pixels

    def _finish(self, result: ModelResult, prompt_type: PromptType, return_detections: bool) -> SegmentResponse:
        started = time.perf_counter()
        segmentation = encode_segmentation(
            result.outputs, result.original_size, self.mask_chunk_pixels, with_instances=return_detections
        )
        timings_ms = {**result.timings_ms, "postprocess": (time.perf_counter() - started) * 1000}
        return to_response(segmentation, prompt_type, timings_ms, image_id=result.image_key)

    async def finish(self, result: ModelResult, prompt_type: PromptType, return_detections: bool) -> SegmentResponse:
        """Upsampling and RLE encoding are CPU-bound: run them off the replica's event loop."""
        return await asyncio.to_thread(self._finish, result, prompt_type, return_detections)
