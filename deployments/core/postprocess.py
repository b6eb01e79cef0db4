"""Raw model outputs to what the API returns: sorted instances, pixel boxes, uint8 masks and their union."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from deployments.core.masks import (
    concept_masks_to_uint8,
    order_by_score_descending,
    scale_boxes,
    tracker_masks_to_uint8,
    union_mask,
)
from deployments.core.runner import ConceptOutput, RawOutput


@dataclass
class Segmentation:
    """The answer to one prompt. Instances are sorted by descending score; point prompts have none."""

    union_mask: np.ndarray  # uint8 [H, W], 0 or 255
    masks: np.ndarray  # uint8 [K, H, W], 0 or 255
    boxes: np.ndarray  # float32 [K, 4], pixel xyxy
    scores: np.ndarray  # float32 [K]


def build_segmentation(output: RawOutput, original_size: tuple[int, int], mask_chunk_size: int) -> Segmentation:
    """Outputs may arrive as read-only arrays from Ray's object store: tensors are made from copies."""
    height, width = original_size
    if not isinstance(output, ConceptOutput):
        mask = tracker_masks_to_uint8(torch.tensor(output.mask_logits), height, width, chunk_size=1)
        return Segmentation(
            union_mask=mask[0],
            masks=np.zeros((0, height, width), dtype=np.uint8),
            boxes=np.zeros((0, 4), dtype=np.float32),
            scores=np.zeros((0,), dtype=np.float32),
        )
    order = order_by_score_descending(torch.tensor(output.scores))
    masks = concept_masks_to_uint8(
        torch.tensor(output.mask_logits)[order], height, width, chunk_size=mask_chunk_size
    )
    boxes = scale_boxes(torch.tensor(output.boxes)[order], height, width)
    return Segmentation(
        union_mask=union_mask(masks, height, width),
        masks=masks,
        boxes=boxes.numpy(),
        scores=output.scores[order.numpy()],
    )
