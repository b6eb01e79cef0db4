"""The CPU postprocessor: sorted instances, pixel boxes, full-size masks and their union, as the wire format."""

from __future__ import annotations

import asyncio
import time

from ray import serve

from client.protocol import PromptType, SegmentResponse
from deployments.config import AppArgs
from deployments.core.postprocess import EncodedSegmentation, encode_segmentation
from deployments.model_pool import ModelResult


def to_response(
    segmentation: EncodedSegmentation, prompt_type: PromptType, timings_ms: dict[str, float]
) -> SegmentResponse:
    """The wire response; without detections the instance lists are empty and only the union travels."""
    height, width = segmentation.union_mask.size
    return SegmentResponse(
        prompt_type=prompt_type,
        height=height,
        width=width,
        union_mask=segmentation.union_mask,
        masks=segmentation.masks,
        boxes=[tuple(float(v) for v in box) for box in segmentation.boxes],
        scores=[float(score) for score in segmentation.scores],
        labels=[int(label) for label in segmentation.labels],
        timings_ms=timings_ms,
    )


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
        return to_response(segmentation, prompt_type, timings_ms)

    async def finish(self, result: ModelResult, prompt_type: PromptType, return_detections: bool) -> SegmentResponse:
        """Upsampling and RLE encoding are CPU-bound: run them off the replica's event loop."""
        return await asyncio.to_thread(self._finish, result, prompt_type, return_detections)
