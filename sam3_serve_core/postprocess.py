"""Raw model outputs to what the API returns: sorted instances, pixel boxes, masks and their union.

Two halves, on either side of the model replica's boundary:
- `finish_segmentation` runs in the model replica, on the model's device (the GPU on a GPU): the concept
  instances of all prompts of a request are merged and sorted by score (each keeps the index of the prompt
  it answers), the request's `max_instances` best are kept, their masks are upsampled to the image's full
  size and thresholded a chunk at a time (a pixel budget bounds the memory), the union is made, and every
  mask is bit-packed. What leaves the replica is a `PackedSegmentation`: one bit per pixel (38 kB per
  640x480 instance), where float32 logits at the model's mask size would be 330 kB.
- `encode_segmentation` (the postprocessor) turns the packed masks into COCO RLE a chunk at a time;
  `unpack_segmentation` gives callers in one process uint8 arrays.
The per-pixel functions are `sam3_serve_core.masks`', the same on CPU and GPU: on CPU the answer is bit
for bit transformers' post-processing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from client.protocol import Polygon, PromptType, RleMask, SegmentResponse
from client.rle import encode_stacked
from sam3_serve_core.masks import (
    concept_mask_chunks,
    keep_above,
    masks_per_chunk,
    order_by_score_descending,
    pack_masks,
    packed_mask_bytes,
    scale_boxes,
    tracker_mask_chunks,
    unpack_masks,
)
from sam3_serve_core.polygons import mask_polygons


@dataclass
class ConceptOutput:
    """Every query of one concept prompt, on the model's device; those above `score_threshold` are kept."""

    scores: torch.Tensor  # float32 [Q]
    boxes: torch.Tensor  # float32 [Q, 4], xyxy in [0, 1]
    mask_logits: torch.Tensor  # [Q, m, m], the model's dtype
    score_threshold: float


@dataclass
class PointOutput:
    """The tracker's mask for one point prompt (the best of three for a single point), on the model's device."""

    mask_logits: torch.Tensor  # [1, m, m], the model's dtype
    iou_score: torch.Tensor  # float32 scalar


RawOutput = ConceptOutput | PointOutput


@dataclass
class PackedSegmentation:
    """One request's answer as it leaves the model replica: host arrays, masks at one bit per pixel.

    Instances are sorted by descending score. A request that wants no instances gets none here, only the union.
    """

    original_size: tuple[int, int]  # (H, W)
    scores: np.ndarray  # float32 [K]
    boxes: np.ndarray  # float32 [K, 4], pixel xyxy
    labels: np.ndarray  # int64 [K], the prompt each instance answers
    masks: np.ndarray  # uint8 [K, ceil(H*W/8)], `masks.pack_masks`' layout
    union_mask: np.ndarray  # uint8 [1, ceil(H*W/8)]

    @property
    def nbytes(self) -> int:
        return sum(array.nbytes for array in (self.scores, self.boxes, self.labels, self.masks, self.union_mask))


@dataclass
class Segmentation:
    """The answer to one request as arrays. Instances are sorted by descending score; point prompts have none."""

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
    polygons: list[list[Polygon]] | None = None  # each instance's outline, when asked
    union_polygons: list[Polygon] | None = None


def finish_segmentation(
    outputs: list[RawOutput],
    original_size: tuple[int, int],
    *,
    chunk_pixels: int,
    max_instances: int | None = None,
    with_instances: bool = True,
) -> PackedSegmentation:
    """One request's raw outputs, on their device, to its packed answer on the host.

    Two waits for the device: which instances are kept, and the copy of the finished arrays (into
    page-locked memory on a GPU, one synchronisation for all of them).
    """
    height, width = original_size
    device = outputs[0].mask_logits.device if outputs else torch.device("cpu")
    scores, boxes, labels, logits = _ranked_instances(outputs, height, width, max_instances, device)
    packed_shape = (len(scores) if with_instances else 0, packed_mask_bytes(height, width))
    packed = torch.empty(packed_shape, dtype=torch.uint8, device=device)
    union = torch.zeros((height, width), dtype=torch.bool, device=device)
    chunk_size = masks_per_chunk(height, width, chunk_pixels)
    start = 0
    for binary in concept_mask_chunks(logits, height, width, chunk_size):
        union |= _any_of(binary)
        if with_instances:
            packed[start : start + binary.shape[0]] = pack_masks(binary)
        start += binary.shape[0]
    for output in outputs:
        if isinstance(output, PointOutput):  # a point prompt's object joins the union, not the instances
            for binary in tracker_mask_chunks(output.mask_logits, height, width, 1):
                union |= binary[0]
    if not with_instances:
        scores, boxes, labels = scores[:0], boxes[:0], labels[:0]
    host = _to_host([scores, boxes, labels, packed, pack_masks(union[None])])
    return PackedSegmentation(original_size, *host)


def _any_of(binary: torch.Tensor) -> torch.Tensor:
    """Pixelwise OR of boolean masks [K, H, W]; as a uint8 max, which a CPU runs some 50x faster than `any`."""
    return binary.view(torch.uint8).amax(dim=0).view(torch.bool)


def _ranked_instances(
    outputs: list[RawOutput], height: int, width: int, max_instances: int | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kept concept instances of all prompts, sorted by descending score, the best `max_instances`.

    Queries under their prompt's threshold rank last (-inf), so one stable sort over every query gives the
    kept ones in score order, ties in prompt then query order: what sorting the kept ones alone gives.
    """
    concepts = [(label, output) for label, output in enumerate(outputs) if isinstance(output, ConceptOutput)]
    if not concepts:
        return (
            torch.zeros((0,), dtype=torch.float32, device=device),
            torch.zeros((0, 4), dtype=torch.float32, device=device),
            torch.zeros((0,), dtype=torch.int64, device=device),
            torch.zeros((0, 1, 1), dtype=torch.float32, device=device),
        )
    scores = torch.cat([output.scores for _, output in concepts])
    kept = torch.cat([keep_above(output.scores, output.score_threshold) for _, output in concepts])
    order = order_by_score_descending(torch.where(kept, scores, float("-inf")))
    # The one wait for the device before the masks: how many are kept, and which (a few kB).
    counted = torch.cat([kept.sum().view(1), order]).cpu().numpy()
    count = int(counted[0]) if max_instances is None else min(int(counted[0]), max_instances)
    top = order[:count]
    labels = torch.cat(
        [torch.full((len(output.scores),), label, dtype=torch.int64, device=device) for label, output in concepts]
    )
    boxes = torch.cat([output.boxes for _, output in concepts])
    logits = _gather_rows([output.mask_logits for _, output in concepts], counted[1 : 1 + count])
    return scores[top], scale_boxes(boxes[top], height, width), labels[top], logits


def _gather_rows(parts: list[torch.Tensor], rows: np.ndarray) -> torch.Tensor:
    """`torch.cat(parts)[rows]` that copies only the chosen rows: all of a prompt's query masks are 66 MB."""
    starts = np.cumsum([0] + [len(part) for part in parts])
    part_of = np.searchsorted(starts, rows, side="right") - 1
    pieces, positions = [], []
    for index, part in enumerate(parts):
        mine = np.flatnonzero(part_of == index)
        if len(mine):
            pieces.append(part[torch.as_tensor(rows[mine] - starts[index], device=part.device)])
            positions.append(mine)
    if not pieces:
        return parts[0][:0]
    if len(pieces) == 1:  # one prompt's rows, already in the asked order
        return pieces[0]
    back_to_asked_order = torch.as_tensor(np.argsort(np.concatenate(positions)), device=pieces[0].device)
    return torch.cat(pieces)[back_to_asked_order]


def _to_host(tensors: list[torch.Tensor]) -> list[np.ndarray]:
    """Device tensors to numpy: on a GPU, copies into page-locked memory and one wait for all of them."""
    if not tensors or tensors[0].device.type != "cuda":
        return [tensor.cpu().numpy() for tensor in tensors]
    host = [torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True) for tensor in tensors]
    for target, tensor in zip(host, tensors):
        target.copy_(tensor, non_blocking=True)
    torch.cuda.current_stream(tensors[0].device).synchronize()
    return [target.numpy() for target in host]


def encode_segmentation(
    packed: PackedSegmentation, chunk_pixels: int, polygon_tolerance: float | None = None
) -> EncodedSegmentation:
    """The wire form: each chunk of masks unpacked, encoded as RLE (and outlined as polygons, with a
    `polygon_tolerance`) and dropped, so memory stays bounded."""
    height, width = packed.original_size
    chunk_size = masks_per_chunk(height, width, chunk_pixels)
    masks: list[RleMask] = []
    polygons: list[list[Polygon]] | None = None if polygon_tolerance is None else []
    for start in range(0, len(packed.masks), chunk_size):
        chunk = unpack_masks(packed.masks[start : start + chunk_size], height, width)
        masks.extend(encode_stacked(chunk))
        if polygons is not None:
            polygons.extend(mask_polygons(chunk[:, :, index], polygon_tolerance) for index in range(chunk.shape[2]))
    union_mask = unpack_masks(packed.union_mask, height, width)
    (union,) = encode_stacked(union_mask)
    return EncodedSegmentation(
        union_mask=union,
        masks=masks,
        boxes=packed.boxes,
        scores=packed.scores,
        labels=packed.labels,
        polygons=polygons,
        union_polygons=None if polygon_tolerance is None else mask_polygons(union_mask[:, :, 0], polygon_tolerance),
    )


def unpack_segmentation(packed: PackedSegmentation) -> Segmentation:
    """Every mask as a uint8 0/255 array (for callers in one process)."""
    height, width = packed.original_size

    def to_uint8(masks: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(unpack_masks(masks, height, width).transpose(2, 0, 1)) * np.uint8(255)

    return Segmentation(
        union_mask=to_uint8(packed.union_mask)[0],
        masks=to_uint8(packed.masks),
        boxes=packed.boxes,
        scores=packed.scores,
        labels=packed.labels,
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
        polygons=segmentation.polygons,
        union_polygons=segmentation.union_polygons,
    )
