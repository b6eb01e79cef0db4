"""Post-processing of SAM 3 model outputs into scores, pixel boxes and uint8 masks.

Pure torch/numpy functions that reproduce, bit for bit, what transformers does in
``Sam3ImageProcessor.post_process_instance_segmentation`` (concept / text prompts) and
``Sam3ImageProcessor.post_process_masks`` (tracker / point prompts), except that the
full-resolution masks are produced a few at a time so that memory stays bounded.
"""

from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

CONCEPT_MASK_THRESHOLD = 0.5
TRACKER_MASK_THRESHOLD = 0.0


def concept_scores(pred_logits: torch.Tensor, presence_logit: torch.Tensor) -> torch.Tensor:
    """Per-query confidence gated by the image-level presence score, as transformers computes it."""
    return pred_logits.sigmoid() * presence_logit.sigmoid()


def keep_above(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Boolean mask of the queries transformers keeps: score strictly greater than ``threshold``."""
    return scores > threshold


def scale_boxes(boxes_xyxy_normalized: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Normalized xyxy boxes to pixels; multiplies by int64 (W, H, W, H) like ``_scale_boxes``."""
    scale = torch.tensor([width, height, width, height], device=boxes_xyxy_normalized.device)
    return boxes_xyxy_normalized * scale


def concept_masks_to_uint8(
    mask_logits: torch.Tensor, height: int, width: int, *, chunk_size: int
) -> np.ndarray:
    """Concept masks [K, h, w] to 0/255 uint8 [K, H, W]: sigmoid, bilinear resize, ``> 0.5``."""
    return _stack_uint8(concept_mask_chunks(mask_logits, height, width, chunk_size), mask_logits.shape[0], height, width)


def tracker_masks_to_uint8(
    mask_logits: torch.Tensor, height: int, width: int, *, chunk_size: int
) -> np.ndarray:
    """Tracker masks [K, h, w] to 0/255 uint8 [K, H, W]: bilinear resize the logits, ``> 0.0``."""
    return _stack_uint8(tracker_mask_chunks(mask_logits, height, width, chunk_size), mask_logits.shape[0], height, width)


def concept_mask_chunks(mask_logits: torch.Tensor, height: int, width: int, chunk_size: int) -> Iterator[torch.Tensor]:
    """Full-size boolean concept masks, ``chunk_size`` at a time, in order."""
    return _binary_chunks(mask_logits, height, width, chunk_size, torch.sigmoid, CONCEPT_MASK_THRESHOLD)


def tracker_mask_chunks(mask_logits: torch.Tensor, height: int, width: int, chunk_size: int) -> Iterator[torch.Tensor]:
    """Full-size boolean tracker masks, ``chunk_size`` at a time, in order."""
    return _binary_chunks(mask_logits, height, width, chunk_size, lambda logits: logits, TRACKER_MASK_THRESHOLD)


def masks_per_chunk(height: int, width: int, chunk_pixels: int) -> int:
    """How many full-size masks fit in a budget of ``chunk_pixels`` pixels (at least one)."""
    return max(1, chunk_pixels // max(1, height * width))


def _binary_chunks(
    mask_logits: torch.Tensor,
    height: int,
    width: int,
    chunk_size: int,
    to_scores: Callable[[torch.Tensor], torch.Tensor],
    threshold: float,
) -> Iterator[torch.Tensor]:
    """Resize ``chunk_size`` masks at a time so all K never exist at full resolution in float.

    Bilinear interpolation is per channel, so a chunk of channels gives the same bits as
    transformers' single call on all K channels of one batch item.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    for start in range(0, mask_logits.shape[0], chunk_size):
        chunk = to_scores(mask_logits[start : start + chunk_size].to(torch.float32))
        resized = F.interpolate(
            chunk.unsqueeze(0), size=(height, width), mode="bilinear", align_corners=False
        ).squeeze(0)
        yield (resized > threshold).cpu()


def _stack_uint8(chunks: Iterator[torch.Tensor], count: int, height: int, width: int) -> np.ndarray:
    out = np.zeros((count, height, width), dtype=np.uint8)
    start = 0
    for binary in chunks:
        out[start : start + binary.shape[0]] = binary.numpy()
        start += binary.shape[0]
    return np.multiply(out, np.uint8(255), out=out)


def union_mask(masks_uint8: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pixelwise OR of 0/255 masks [K, H, W] into one [H, W] mask; all zeros when K == 0."""
    if masks_uint8.shape[0] == 0:
        return np.zeros((height, width), dtype=np.uint8)
    return masks_uint8.max(axis=0)


def order_by_score_descending(scores: torch.Tensor) -> torch.Tensor:
    """Permutation sorting ``scores`` high to low; stable, so tied scores keep their query order."""
    return torch.sort(scores, descending=True, stable=True).indices
