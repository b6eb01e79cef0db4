"""The CPU postprocessor: sorted instances, pixel boxes, full-size masks and their union, as the wire format."""

from __future__ import annotations

import asyncio

from ray import serve

from client.protocol import PromptType, SegmentResponse
from client.rle import encode_mask
from deployments.config import AppArgs
from deployments.core.postprocess import Segmentation, build_segmentation
from deployments.model_pool import ModelResult


def to_response(segmentation: Segmentation, prompt_type: PromptType, return_detections: bool) -> SegmentResponse:
    """The wire response; without detections only the union mask travels (what `run()` needs)."""
    height, width = segmentation.union_mask.shape
    detections = {}
    if return_detections:
        detections = {
            "masks": [encode_mask(mask) for mask in segmentation.masks],
            "boxes": [tuple(float(v) for v in box) for box in segmentation.boxes],
            "scores": [float(score) for score in segmentation.scores],
        }
    return SegmentResponse(
        prompt_type=prompt_type,
        height=height,
        width=width,
        union_mask=encode_mask(segmentation.union_mask),
        **detections,
    )


@serve.deployment(ray_actor_options={"num_cpus": 1})
class Sam3Postprocessor:
    def __init__(self, args: AppArgs):
        self.mask_chunk_size = args.mask_chunk_size

    def _finish(self, result: ModelResult, prompt_type: PromptType, return_detections: bool) -> SegmentResponse:
        (output,) = result.outputs
        segmentation = build_segmentation(output, result.original_size, self.mask_chunk_size)
        return to_response(segmentation, prompt_type, return_detections)

    async def finish(self, result: ModelResult, prompt_type: PromptType, return_detections: bool) -> SegmentResponse:
        """Upsampling and RLE encoding are CPU-bound: run them off the replica's event loop."""
        return await asyncio.to_thread(self._finish, result, prompt_type, return_detections)
