"""What an answer is guaranteed to equal, and the one place the tests compare answers.

**The same computation gives the same bits.** One image alone through `Sam3Pipeline.segment` equals
transformers' own pipeline bit for bit (`tests/integration/test_parity.py`), and the same call again gives
the same bits. So does the service for requests computed alike: sent one at a time (each a batch of one),
on an image whose features a replica holds, they are answered from the very features it cached and give
identical answers (`assert_same_answer`). The torch thread count did not change the bits on CPU (1 and 2
threads gave identical logits on the tiny checkpoint).

**Across batch compositions, answers agree within bounds.** On a CPU a batch of 4 and a batch of 1 run
different matrix kernels, so the logits of an image differ in their last bits with its batch companions:
the ViT pass that encoded it (the service caches those features, so a later request inherits the batch its
image was first encoded in), the text encoder's batch of new texts (cached too), and the detector's or the
tracker's batch. A mask pixel whose logit sits on the threshold, or an instance whose score does, may then
fall either side. The service batches requests as they arrive, so its answer is held to the in-process
pipeline with `assert_close_answer`:

- an instance whose score is within `SCORE_TOLERANCE` of the threshold may be in one answer and not in the
  other; every other instance is in both, with the same label;
- matched instances' scores differ by at most `SCORE_TOLERANCE`, their pixel boxes by `BOX_TOLERANCE_PX`;
- each matched instance's mask, and the union (leaving out the pixels of instances that may be missing),
  differ in at most `allowed_pixels(H, W)` pixels: `MASK_PIXEL_FRACTION` of the image, and never fewer
  than `MASK_MIN_PIXELS` (one pixel is 0.13% of the tests' smallest images).

Measured with `python -m benchmarks.batch_parity` (tiny checkpoints at 56 and 112 px, CPU, 2 threads, torch
2.14): 20 batches of 4 and 20 of 8 per checkpoint, mixing text, two-text, box and point prompts on images
from 24x24 to 480x640, each item against itself alone: 480 items, 4,279 instances, 352 M mask pixels
compared. The largest differences: scores 8.3e-7, boxes 1.5e-5 px, raw mask logits 1.6e-5; 65 mask pixels
differed in all (1.8e-7 of them), at most 2 in one mask (0.015% of its image); no instance was kept in one
and dropped in the other. Rare, but the job tests compare some 8 M mask pixels: most runs see a flip.
The bounds leave room over those maxima: 12x for scores, 65x for boxes, 13x for the logits, 4x the most
pixels seen in one mask at the floor of 8 and 13x its fraction. A wrong answer (another image, prompt or
checkpoint) differs in far more.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pycocotools import mask as coco_mask

SCORE_THRESHOLD = 0.5  # the service's default (`score_threshold` in serve_config.yaml)
SCORE_TOLERANCE = 1e-5
BOX_TOLERANCE_PX = 1e-3
MASK_PIXEL_FRACTION = 0.002
MASK_MIN_PIXELS = 8
# Raw mask logits (the runner's output, before the threshold) of one image in batches of different sizes.
LOGIT_TOLERANCE = 2e-4


def allowed_pixels(height: int, width: int) -> int:
    """Pixels in which one mask (or the union) may differ across batch compositions."""
    return max(MASK_MIN_PIXELS, math.ceil(MASK_PIXEL_FRACTION * height * width))


@dataclass(frozen=True)
class Answer:
    """One answer in one form, whatever it came as: masks as booleans, numbers as float64.

    `masks` is None when only the union is known (`run()`, or an answer listing no instances).
    """

    union_mask: np.ndarray
    masks: np.ndarray | None
    scores: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray

    @property
    def instances(self) -> int:
        return len(self.scores)


def answer_of(value: Any) -> Answer:
    """An `Answer` from a `Segmentation`, a `SegmentResponse`, `run_with_detections()`'s dict, a job's output
    row (COCO RLE dicts), or a bare union mask (`run()`)."""
    if isinstance(value, Answer):
        return value
    if isinstance(value, np.ndarray):
        return Answer(_binary(value), None, np.zeros(0), np.zeros((0, 4)), np.zeros(0, dtype=np.int64))
    fields = value if isinstance(value, dict) else {name: getattr(value, name) for name in _FIELDS}
    union = _binary(_decoded(fields["union_mask"]))
    masks = [_binary(_decoded(mask)) for mask in (fields["masks"] if fields["masks"] is not None else [])]
    scores = np.asarray(fields["scores"] if fields["scores"] is not None else [], dtype=np.float64).reshape(-1)
    return Answer(
        union_mask=union,
        masks=np.stack(masks) if len(masks) else None,
        scores=scores,
        boxes=np.asarray(fields["boxes"] if fields["boxes"] is not None else [], dtype=np.float64).reshape(-1, 4),
        labels=np.asarray(fields["labels"] if fields["labels"] is not None else [], dtype=np.int64).reshape(-1),
    )


_FIELDS = ("union_mask", "masks", "scores", "boxes", "labels")


def _decoded(mask: Any) -> np.ndarray:
    """A mask as an array: arrays as they are, COCO RLE (the wire's `RleMask` or a job row's dict) decoded."""
    if isinstance(mask, np.ndarray):
        return mask
    size, counts = (mask["size"], mask["counts"]) if isinstance(mask, dict) else (mask.size, mask.counts)
    counts = counts.encode("ascii") if isinstance(counts, str) else counts
    return coco_mask.decode({"size": list(size), "counts": counts})


def _binary(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    assert mask.dtype == np.bool_ or set(np.unique(mask).tolist()) <= {0, 1, 255}, "a mask is 0/255 (or 0/1)"
    return mask != 0


@dataclass(frozen=True)
class Expected:
    """The in-process answer computed with the threshold lowered by `SCORE_TOLERANCE`, so that it also holds
    the instances that may be missing from an answer: those whose score is within the tolerance of it."""

    answer: Answer
    score_threshold: float

    @property
    def certain(self) -> np.ndarray:
        """Which instances every answer must hold."""
        return self.answer.scores > self.score_threshold + SCORE_TOLERANCE

    def union_certain(self) -> np.ndarray:
        """The union of the instances every answer holds (a point prompt's object, which is no instance, too)."""
        if self.answer.masks is None:
            return self.answer.union_mask
        return self.answer.masks[self.certain].any(axis=0)

    def union_maybe(self) -> np.ndarray:
        """Pixels of the instances an answer may have or not."""
        if self.answer.masks is None:
            return np.zeros_like(self.answer.union_mask)
        return self.answer.masks[~self.certain].any(axis=0)

    def at_threshold(self) -> Answer:
        """What the pipeline itself answers at the threshold (for tests that want one mask to compare with)."""
        kept = self.answer.scores > self.score_threshold
        if self.answer.masks is None:
            return self.answer
        masks = self.answer.masks[kept]
        union = masks.any(axis=0) if len(masks) else np.zeros_like(self.answer.union_mask)
        return Answer(union, masks, self.answer.scores[kept], self.answer.boxes[kept], self.answer.labels[kept])


def expect(pipeline, image, *, score_threshold: float = SCORE_THRESHOLD, **prompt) -> Expected:
    """What `pipeline` (a `Sam3Pipeline`) answers for `image` and `prompt`, for `assert_close_answer`."""
    lowered = pipeline.segment(image, score_threshold=score_threshold - SCORE_TOLERANCE, **prompt)
    return Expected(answer_of(lowered), score_threshold)


def expect_from(segmentation: Any, score_threshold: float = SCORE_THRESHOLD) -> Expected:
    """An `Expected` from an answer computed at `score_threshold - SCORE_TOLERANCE` by other means."""
    return Expected(answer_of(segmentation), score_threshold)


@dataclass
class Differences:
    """How an answer differs from what was expected; `problems` lists what breaks the bounds."""

    max_score_diff: float = 0.0
    max_box_diff_px: float = 0.0
    max_mask_pixels: int = 0  # the most pixels in which one matched instance's mask differs
    mask_pixels: int = 0  # pixels that differ over all matched instances
    union_pixels: int = 0  # pixels of the union that differ, besides those of instances that may be missing
    compared_pixels: int = 0  # mask pixels compared (matched instances and the union)
    instances: int = 0  # matched instances
    maybe_flipped: int = 0  # instances near the threshold that are in one answer only
    problems: list[str] = field(default_factory=list)


def differences(actual: Any, expected: Expected) -> Differences:
    """Every difference of `actual` (any form `answer_of` takes) from `expected`, and which break the bounds."""
    answer, reference = answer_of(actual), expected.answer
    found = Differences()
    height, width = reference.union_mask.shape
    if answer.union_mask.shape != (height, width):
        found.problems.append(f"union mask of shape {answer.union_mask.shape}, expected {(height, width)}")
        return found
    allowed = allowed_pixels(height, width)
    if answer.masks is not None:
        _match_instances(answer, expected, allowed, found)
    certain, maybe = expected.union_certain(), expected.union_maybe()
    union_diff = (answer.union_mask & ~certain & ~maybe) | (certain & ~answer.union_mask)
    found.union_pixels = int(union_diff.sum())
    found.compared_pixels += height * width
    if found.union_pixels > allowed:
        where = np.argwhere(union_diff)[:3].tolist()
        found.problems.append(f"union mask differs in {found.union_pixels} pixels (at most {allowed}), e.g. at {where}")
    return found


def _match_instances(answer: Answer, expected: Expected, allowed: int, found: Differences) -> None:
    """Each answered instance to an expected one of the same label and a score within the tolerance (the
    closest mask among them: near-equal scores may be ordered either way)."""
    reference = expected.answer
    if answer.masks is not None and len(answer.masks) != answer.instances:
        found.problems.append(f"{len(answer.masks)} masks for {answer.instances} instances")
        return
    if np.any(np.diff(answer.scores) > 0):
        found.problems.append(f"scores not in descending order: {answer.scores.tolist()}")
    matched = np.zeros(reference.instances, dtype=bool)
    for index in range(answer.instances):
        score, label = answer.scores[index], answer.labels[index]
        candidates = [
            other
            for other in range(reference.instances)
            if not matched[other]
            and reference.labels[other] == label
            and abs(reference.scores[other] - score) <= SCORE_TOLERANCE
        ]
        if not candidates:
            found.problems.append(f"instance {index} (score {score:.7f}, label {label}) is not in the expected answer")
            continue
        pixels = {other: int((answer.masks[index] != reference.masks[other]).sum()) for other in candidates}
        other = min(candidates, key=pixels.__getitem__)
        matched[other] = True
        found.instances += 1
        found.max_score_diff = max(found.max_score_diff, float(abs(reference.scores[other] - score)))
        box_diff = float(np.abs(reference.boxes[other] - answer.boxes[index]).max())
        found.max_box_diff_px = max(found.max_box_diff_px, box_diff)
        found.max_mask_pixels = max(found.max_mask_pixels, pixels[other])
        found.mask_pixels += pixels[other]
        found.compared_pixels += answer.masks[index].size
        if box_diff > BOX_TOLERANCE_PX:
            found.problems.append(f"instance {index}: box differs by {box_diff:.2e} px (at most {BOX_TOLERANCE_PX})")
        if pixels[other] > allowed:
            found.problems.append(f"instance {index}: mask differs in {pixels[other]} pixels (at most {allowed})")
    # Near the threshold, an instance may be in one answer only: kept here and not there, or the reverse.
    above = reference.scores > expected.score_threshold
    found.maybe_flipped = int((~expected.certain & (matched != above)).sum())
    for other in np.flatnonzero(~matched & expected.certain):
        found.problems.append(
            f"expected instance (score {reference.scores[other]:.7f}, label {reference.labels[other]}) is missing"
        )


def close_answer(actual: Any, expected: Expected) -> bool:
    """Whether `actual` is within the bounds of `expected` (for load generators that count wrong answers)."""
    return not differences(actual, expected).problems


def assert_close_answer(actual: Any, expected: Expected) -> None:
    """`actual` agrees with `expected` within the bounds that hold across batch compositions."""
    problems = differences(actual, expected).problems
    assert not problems, "answer outside the bounds across batch compositions:\n  " + "\n  ".join(problems)


def assert_same_answer(actual: Any, expected: Any) -> None:
    """Bit for bit: for two answers of the same computation (the same batch shape for every model call)."""
    a, b = answer_of(actual), answer_of(expected)
    np.testing.assert_array_equal(a.union_mask, b.union_mask)
    if a.masks is None or b.masks is None:  # a union alone (`run()`), or an answer without instances
        return
    np.testing.assert_array_equal(a.masks, b.masks)
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.boxes, b.boxes)
    np.testing.assert_array_equal(a.labels, b.labels)


# How near the threshold a resized mask value may sit for chunked and whole resizes to disagree on its pixel:
# far above float32's last bit on the values compared (probabilities, and tracker logits up to ~50).
RESIZED_VALUE_TOLERANCE = 1e-5


def assert_same_masks_off_threshold(masks: np.ndarray, other: np.ndarray, logits, height: int, width: int, to_uint8) -> None:
    """Two resizes of the same mask logits (chunked differently) agree on every pixel whose resized value is not
    within `RESIZED_VALUE_TOLERANCE` of the threshold (`sam3_serve_core.masks._binary_chunks`)."""
    import torch.nn.functional as F

    from sam3_serve_core.masks import (
        CONCEPT_MASK_THRESHOLD,
        TRACKER_MASK_THRESHOLD,
        concept_masks_to_uint8,
    )

    if logits.shape[0] == 0:
        assert masks.shape == other.shape
        return
    values = logits.double().sigmoid() if to_uint8 is concept_masks_to_uint8 else logits.double()
    threshold = CONCEPT_MASK_THRESHOLD if to_uint8 is concept_masks_to_uint8 else TRACKER_MASK_THRESHOLD
    resized = F.interpolate(values.unsqueeze(0), size=(height, width), mode="bilinear", align_corners=False)[0]
    off_threshold = ~((resized - threshold).abs() <= RESIZED_VALUE_TOLERANCE).numpy()
    np.testing.assert_array_equal(masks[off_threshold], other[off_threshold])
