"""Post-processing of SAM 3 model outputs into scores, pixel boxes and binary masks.

Pure torch/numpy functions that reproduce, bit for bit, what transformers does in
``Sam3ImageProcessor.post_process_instance_segmentation`` (concept / text prompts) and
``Sam3ImageProcessor.post_process_masks`` (tracker / point prompts), except that the
full-resolution masks are produced a few at a time so that memory stays bounded. They run on
whatever device their inputs are on: the model replica runs them on its GPU, so only bit-packed
masks leave it (`pack_masks`, one bit per pixel, 1/32 of float32 logits at full size).
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

    Bilinear interpolation is per channel, but the CPU kernel vectorises differently by channel count (8 or
    more take another path), so a chunk's values can differ from transformers' single call on all K masks in
    the last bit: the masks are the same except at a pixel whose value sits on the threshold to within that
    bit. A chunk that holds all K masks is transformers' own call.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    for start in range(0, mask_logits.shape[0], chunk_size):
        chunk = to_scores(mask_logits[start : start + chunk_size].to(torch.float32))
        resized = F.interpolate(
            chunk.unsqueeze(0), size=(height, width), mode="bilinear", align_corners=False
        ).squeeze(0)
        yield resized > threshold


def _stack_uint8(chunks: Iterator[torch.Tensor], count: int, height: int, width: int) -> np.ndarray:
    out = np.zeros((count, height, width), dtype=np.uint8)
    start = 0
    for binary in chunks:
        out[start : start + binary.shape[0]] = binary.cpu().numpy()
        start += binary.shape[0]
    return np.multiply(out, np.uint8(255), out=out)


def order_by_score_descending(scores: torch.Tensor) -> torch.Tensor:
    """Permutation sorting ``scores`` high to low; stable, so tied scores keep their query order."""
    return torch.sort(scores, descending=True, stable=True).indices


_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)  # np.packbits' default ("big") bit order


def packed_mask_bytes(height: int, width: int) -> int:
    """Bytes of one packed (H, W) mask: a bit per pixel, the last byte padded with zeros."""
    return (height * width + 7) // 8


def pack_masks(binary: torch.Tensor) -> torch.Tensor:
    """Boolean masks [K, H, W] to uint8 [K, ceil(H*W/8)], on their device, pixels in column-major order.

    Column-major is COCO RLE's order: `unpack_masks` gives pycocotools its Fortran (H, W, K) input without a
    transposing copy. The bit order is `np.packbits`' default, so `np.unpackbits` undoes it. On a CPU,
    `np.packbits` itself does the packing (about 2.5x the torch ops' speed there).
    """
    count, height, width = binary.shape
    columns = binary.transpose(1, 2).reshape(count, height * width)
    if binary.device.type == "cpu":
        return torch.from_numpy(np.packbits(columns.numpy(), axis=1))
    return pack_bits_on_device(columns)


def pack_bits_on_device(columns: torch.Tensor) -> torch.Tensor:
    """`np.packbits(columns, axis=1)` as torch ops, for masks on a GPU."""
    count, pixels = columns.shape
    padding = -pixels % 8
    columns = F.pad(columns.to(torch.uint8), (0, padding))
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=columns.device)
    return (columns.view(count, -1, 8) * weights).sum(dim=-1, dtype=torch.uint8)


def unpack_masks(packed: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [K, ceil(H*W/8)] from `pack_masks` to 0/1 uint8 masks as an (H, W, K) Fortran-ordered array."""
    count = packed.shape[0]
    bits = np.unpackbits(packed, axis=1, count=height * width)
    return bits.reshape(count, width, height).transpose(2, 1, 0)
