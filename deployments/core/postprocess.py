"""Raw model outputs to what the API returns: sorted instances, pixel boxes, masks and their union.

All prompts of one request are answered together: concept instances from every text or box set are
merged and sorted by score (each keeps the index of the prompt it answers), and the union covers them
all. Full-size masks are made a chunk at a time (a pixel budget, not an instance count), so memory is
bounded by the chunk: `encode_segmentation` turns each chunk into COCO RLE and drops it, and without
detections it never keeps a per-instance mask at all.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from client.protocol import PromptType, RleMask, SegmentResponse
from client.rle import encode_mask, encode_masks
from deployments.core.masks import (
    concept_mask_chunks,
    concept_masks_to_uint8,
    masks_per_chunk,
    order_by_score_descending,
    scale_boxes,
    tracker_mask_chunks,
    tracker_masks_to_uint8,
    union_mask,
)
from deployments.core.runner import ConceptOutput, PointOutput, RawOutput


@dataclass
class Segmentation:
    """The answer to one request. Instances are sorted by descending score; point prompts have none."""

    union_mask: np.ndarray  # uint8 [H, W], 0 or 255
    masks: np.ndarray  # uint8 [K, H, W], 0 or 255
    boxes: np.ndarray  # float32 [K, 4], pixel xyxy
    scores: np.ndarray  # float32 [K]
    labels: np.ndarray  # int64 [K], the prompt each instance answers


@dataclass
class EncodedSegmentation:
    """A `Segmentation` with its masks as COCO RLE, built without holding every mask at once."""

    union_mask: RleMask
    masks: list[RleMask]
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray


@dataclass
class _Instances:
    """Every kept instance of a request's concept prompts, sorted by descending score."""

    scores: np.ndarray
    boxes: np.ndarray  # pixel xyxy
    labels: np.ndarray
    mask_logits: torch.Tensor


def build_segmentation(outputs: list[RawOutput], original_size: tuple[int, int], chunk_pixels: int) -> Segmentation:
    """Every instance's full-size mask as an array (for callers in one process)."""
    height, width = original_size
    instances = _sorted_instances(outputs, height, width)
    chunk_size = masks_per_chunk(height, width, chunk_pixels)
    masks = concept_masks_to_uint8(instances.mask_logits, height, width, chunk_size=chunk_size)
    union = union_mask(masks, height, width)
    for output in outputs:
        if isinstance(output, PointOutput):  # a point prompt's object joins the union, not the instances
            point_mask = tracker_masks_to_uint8(torch.tensor(output.mask_logits), height, width, chunk_size=1)
            np.maximum(union, point_mask[0], out=union)
    return Segmentation(
        union_mask=union,
        masks=masks,
        boxes=instances.boxes,
        scores=instances.scores,
        labels=instances.labels,
    )


def encode_segmentation(
    outputs: list[RawOutput], original_size: tuple[int, int], chunk_pixels: int, *, with_instances: bool
) -> EncodedSegmentation:
    """The wire form, streamed: each chunk of masks is OR'd into the union, encoded if wanted, dropped."""
    height, width = original_size
    instances = _sorted_instances(outputs, height, width)
    union = torch.zeros((height, width), dtype=torch.bool)
    masks: list[RleMask] = []
    for binary in _mask_chunks(outputs, instances, height, width, chunk_pixels):
        union |= binary.any(dim=0)
        if with_instances and len(masks) < len(instances.scores):  # a point prompt's object: union only
            masks.extend(encode_masks(binary.numpy()))
    if not with_instances:
        instances = _sorted_instances([], height, width)
    return EncodedSegmentation(
        union_mask=encode_mask(union.numpy()),
        masks=masks,
        boxes=instances.boxes,
        scores=instances.scores,
        labels=instances.labels,
    )


def to_response(
    segmentation: EncodedSegmentation,
    prompt_type: PromptType,
    timings_ms: dict[str, float],
    image_id: str | None = None,
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
        image_id=image_id,
    )


def _sorted_instances(outputs: list[RawOutput], height: int, width: int) -> _Instances:
    """Concept instances of all prompts, merged and sorted; a stable sort keeps prompt then query order on ties."""
    concepts = [(label, output) for label, output in enumerate(outputs) if isinstance(output, ConceptOutput)]
    if not concepts:
        return _Instances(
            scores=np.zeros((0,), dtype=np.float32),
            boxes=np.zeros((0, 4), dtype=np.float32),
            labels=np.zeros((0,), dtype=np.int64),
            mask_logits=torch.zeros((0, 1, 1)),
        )
    # Outputs may arrive as read-only arrays from Ray's object store: tensors are made from copies.
    scores = torch.tensor(np.concatenate([output.scores for _, output in concepts]))
    order = order_by_score_descending(scores)
    boxes = torch.tensor(np.concatenate([output.boxes for _, output in concepts]))
    labels = np.concatenate([np.full(len(output.scores), label, dtype=np.int64) for label, output in concepts])
    logits = torch.tensor(np.concatenate([output.mask_logits for _, output in concepts]))
    return _Instances(
        scores=scores[order].numpy(),
        boxes=scale_boxes(boxes[order], height, width).numpy(),
        labels=labels[order.numpy()],
        mask_logits=logits[order],
    )


def _mask_chunks(
    outputs: list[RawOutput], instances: _Instances, height: int, width: int, chunk_pixels: int
) -> Iterator[torch.Tensor]:
    """Boolean full-size masks: the concept instances in score order, then any point prompt's object."""
    chunk_size = masks_per_chunk(height, width, chunk_pixels)
    yield from concept_mask_chunks(instances.mask_logits, height, width, chunk_size)
    for output in outputs:
        if isinstance(output, PointOutput):
            yield from tracker_mask_chunks(torch.tensor(output.mask_logits), height, width, 1)
