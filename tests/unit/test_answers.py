"""The tests' comparison of answers (`tests/answers.py`) on made-up answers: what it lets through, what not."""

from __future__ import annotations

import numpy as np
import pytest

from client.protocol import SegmentResponse
from client.rle import encode_mask, encode_masks
from tests.answers import (
    MASK_MIN_PIXELS,
    SCORE_TOLERANCE,
    Answer,
    allowed_pixels,
    assert_close_answer,
    assert_same_answer,
    differences,
    expect_from,
)

H, W = 40, 50  # allowed_pixels: 8


def box_mask(y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
    mask = np.zeros((H, W), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def bounding_box(mask: np.ndarray) -> list[float]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


def answer(scores: list[float], masks: list[np.ndarray], labels: list[int] | None = None) -> Answer:
    stacked = np.stack(masks) if masks else None
    union = stacked.any(axis=0) if masks else np.zeros((H, W), dtype=bool)
    boxes = np.array([bounding_box(mask) for mask in masks]).reshape(-1, 4)
    labels = labels if labels is not None else [0] * len(scores)
    return Answer(union, stacked, np.array(scores), boxes, np.array(labels))


# What the pipeline gives at the threshold lowered by the tolerance: two sure instances and one right on it.
SURE_A, SURE_B, NEAR = box_mask(0, 0, 10, 10), box_mask(20, 20, 30, 40), box_mask(30, 0, 40, 10)
EXPECTED = expect_from(answer([0.9, 0.7, 0.5 + SCORE_TOLERANCE / 2], [SURE_A, SURE_B, NEAR]))


def flipped(mask: np.ndarray, pixels: int) -> np.ndarray:
    out = mask.copy()
    out.flat[:pixels] = ~out.flat[:pixels]
    return out


def test_the_bound_is_a_fraction_of_the_image_and_never_below_a_few_pixels():
    assert allowed_pixels(H, W) == MASK_MIN_PIXELS
    assert allowed_pixels(480, 640) == 615


def test_the_same_answer_passes_with_or_without_the_instance_near_the_threshold():
    assert_close_answer(answer([0.9, 0.7, 0.5 + SCORE_TOLERANCE / 2], [SURE_A, SURE_B, NEAR]), EXPECTED)
    assert_close_answer(answer([0.9, 0.7], [SURE_A, SURE_B]), EXPECTED)
    assert differences(answer([0.9, 0.7], [SURE_A, SURE_B]), EXPECTED).maybe_flipped == 1


def test_a_missing_sure_instance_or_an_unknown_one_fails():
    with pytest.raises(AssertionError, match="is missing"):
        assert_close_answer(answer([0.9], [SURE_A]), EXPECTED)
    with pytest.raises(AssertionError, match="not in the expected answer"):
        assert_close_answer(answer([0.9, 0.8, 0.7], [SURE_A, NEAR, SURE_B]), EXPECTED)


def test_scores_boxes_and_labels_must_agree():
    with pytest.raises(AssertionError, match="not in the expected answer"):  # a score off by more than the tolerance
        assert_close_answer(answer([0.9, 0.7 + 3 * SCORE_TOLERANCE], [SURE_A, SURE_B]), EXPECTED)
    with pytest.raises(AssertionError, match="not in the expected answer"):
        assert_close_answer(answer([0.9, 0.7], [SURE_A, SURE_B], labels=[0, 1]), EXPECTED)
    moved = answer([0.9, 0.7], [SURE_A, SURE_B])
    moved.boxes[1, 0] += 0.01
    with pytest.raises(AssertionError, match="box differs"):
        assert_close_answer(moved, EXPECTED)


def test_masks_may_differ_in_a_few_pixels_only():
    assert_close_answer(answer([0.9, 0.7], [flipped(SURE_A, 8), SURE_B]), EXPECTED)
    with pytest.raises(AssertionError, match="mask differs in 9 pixels"):
        assert_close_answer(answer([0.9, 0.7], [flipped(SURE_A, 9), SURE_B]), EXPECTED)


def test_instances_with_scores_within_the_tolerance_may_come_in_either_order():
    close = expect_from(answer([0.8, 0.8 - SCORE_TOLERANCE / 2], [SURE_A, SURE_B]))
    assert_close_answer(answer([0.8, 0.8 - SCORE_TOLERANCE / 4], [SURE_B, SURE_A]), close)


def test_a_union_alone_may_lack_the_instance_near_the_threshold_but_not_a_sure_one():
    assert_close_answer(SURE_A | SURE_B, EXPECTED)
    assert_close_answer((SURE_A | SURE_B | NEAR).astype(np.uint8) * 255, EXPECTED)
    assert_close_answer(flipped(SURE_A | SURE_B, 8), EXPECTED)
    with pytest.raises(AssertionError, match="union mask differs"):
        assert_close_answer(SURE_A, EXPECTED)
    with pytest.raises(AssertionError, match="union mask differs"):
        assert_close_answer(SURE_A | SURE_B | box_mask(10, 40, 20, 50), EXPECTED)


def test_a_point_answer_is_its_union():
    point = expect_from(Answer(SURE_B, None, np.zeros(0), np.zeros((0, 4)), np.zeros(0, dtype=np.int64)))
    assert_close_answer(flipped(SURE_B, 8), point)
    with pytest.raises(AssertionError, match="union mask differs"):
        assert_close_answer(SURE_A, point)


def test_every_form_of_an_answer_reads_the_same():
    ours = answer([0.9, 0.7], [SURE_A, SURE_B])
    response = SegmentResponse(
        prompt_type="text", height=H, width=W, union_mask=encode_mask(ours.union_mask),
        masks=encode_masks(ours.masks), boxes=[tuple(box) for box in ours.boxes], scores=list(ours.scores),
        labels=[0, 0],
    )  # fmt: skip
    detections = {
        "union_mask": ours.union_mask.astype(np.uint8) * 255, "masks": [m.astype(np.uint8) * 255 for m in ours.masks],
        "boxes": ours.boxes.tolist(), "scores": ours.scores.tolist(), "labels": [0, 0],
    }  # fmt: skip
    row = {**response.model_dump(include={"boxes", "scores", "labels"}), "union_mask": response.union_mask.model_dump(),
           "masks": [mask.model_dump() for mask in response.masks]}  # fmt: skip
    for form in (response, detections, row):
        assert_same_answer(form, ours)
        assert_close_answer(form, expect_from(ours))


def test_the_same_answer_is_bit_for_bit():
    ours = answer([0.9, 0.7], [SURE_A, SURE_B])
    with pytest.raises(AssertionError):
        assert_same_answer(answer([0.9, 0.7], [flipped(SURE_A, 1), SURE_B]), ours)
    with pytest.raises(AssertionError):
        assert_same_answer(answer([0.9, 0.7 + 1e-7], [SURE_A, SURE_B]), ours)
    assert_same_answer(ours.union_mask, ours)  # a union alone: only the union to compare
