"""Post-processing of several prompts' outputs: merged, sorted, labelled; streamed RLE equals the arrays."""

from __future__ import annotations

import numpy as np
import pytest

from client.rle import decode_mask
from deployments.core.postprocess import build_segmentation, encode_segmentation
from deployments.core.runner import ConceptOutput, PointOutput

HEIGHT, WIDTH, LOW_RES = 37, 53, 16


def concept_output(seed: int, count: int) -> ConceptOutput:
    rng = np.random.default_rng(seed)
    corners = np.sort(rng.uniform(0, 1, size=(count, 2, 2)), axis=1).reshape(count, 4)
    return ConceptOutput(
        scores=rng.uniform(0.5, 1, size=count).astype(np.float32),
        boxes=corners[:, [0, 2, 1, 3]].astype(np.float32),
        mask_logits=rng.normal(0, 3, size=(count, LOW_RES, LOW_RES)).astype(np.float32),
    )


def test_instances_of_all_prompts_are_merged_sorted_and_labelled():
    outputs = [concept_output(1, 3), concept_output(2, 0), concept_output(3, 4)]
    result = build_segmentation(outputs, (HEIGHT, WIDTH), chunk_pixels=10**9)
    assert list(result.scores) == sorted(result.scores, reverse=True)
    assert sorted(result.labels.tolist()) == [0, 0, 0, 2, 2, 2, 2]
    for label, output in ((0, outputs[0]), (2, outputs[2])):
        alone = build_segmentation([output], (HEIGHT, WIDTH), chunk_pixels=10**9)
        np.testing.assert_array_equal(result.masks[result.labels == label], alone.masks)
        np.testing.assert_array_equal(result.scores[result.labels == label], alone.scores)
        np.testing.assert_array_equal(result.boxes[result.labels == label], alone.boxes)
    np.testing.assert_array_equal(result.union_mask, result.masks.max(axis=0))


@pytest.mark.parametrize("chunk_pixels", [1, HEIGHT * WIDTH * 2, 10**9])
def test_streamed_encoding_equals_the_full_arrays_whatever_the_chunk(chunk_pixels):
    outputs = [concept_output(4, 5), concept_output(5, 3)]
    full = build_segmentation(outputs, (HEIGHT, WIDTH), chunk_pixels=10**9)
    encoded = encode_segmentation(outputs, (HEIGHT, WIDTH), chunk_pixels, with_instances=True)
    np.testing.assert_array_equal(np.stack([decode_mask(mask) for mask in encoded.masks]), full.masks)
    np.testing.assert_array_equal(decode_mask(encoded.union_mask), full.union_mask)
    np.testing.assert_array_equal(encoded.scores, full.scores)
    np.testing.assert_array_equal(encoded.boxes, full.boxes)
    np.testing.assert_array_equal(encoded.labels, full.labels)


def test_union_only_keeps_no_instances():
    outputs = [concept_output(6, 4)]
    full = build_segmentation(outputs, (HEIGHT, WIDTH), chunk_pixels=10**9)
    encoded = encode_segmentation(outputs, (HEIGHT, WIDTH), HEIGHT * WIDTH, with_instances=False)
    np.testing.assert_array_equal(decode_mask(encoded.union_mask), full.union_mask)
    assert encoded.masks == [] and len(encoded.scores) == len(encoded.boxes) == len(encoded.labels) == 0


def test_a_point_prompt_gives_its_object_as_the_union_and_no_instances():
    rng = np.random.default_rng(7)
    point = PointOutput(mask_logits=rng.normal(0, 3, size=(1, LOW_RES, LOW_RES)).astype(np.float32), iou_score=0.9)
    full = build_segmentation([point], (HEIGHT, WIDTH), chunk_pixels=1)
    encoded = encode_segmentation([point], (HEIGHT, WIDTH), 1, with_instances=True)
    assert full.masks.shape == (0, HEIGHT, WIDTH) and encoded.masks == []
    assert 0 < np.count_nonzero(full.union_mask) < HEIGHT * WIDTH
    np.testing.assert_array_equal(decode_mask(encoded.union_mask), full.union_mask)


def test_no_instances_give_an_empty_union_of_the_image_size():
    encoded = encode_segmentation([concept_output(8, 0)], (HEIGHT, WIDTH), 100, with_instances=True)
    assert encoded.union_mask.size == (HEIGHT, WIDTH)
    assert not decode_mask(encoded.union_mask).any()
