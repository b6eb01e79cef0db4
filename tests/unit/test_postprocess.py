"""Finishing a request's outputs: merged, sorted, labelled, the best `max_instances`, bit-packed; the RLE of the
packed masks equals the arrays, and both equal transformers' per-pixel steps applied to the same logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client.rle import decode_mask
from sam3_serve_core.masks import (
    concept_masks_to_uint8,
    pack_bits_on_device,
    pack_masks,
    scale_boxes,
    tracker_masks_to_uint8,
    unpack_masks,
)
from sam3_serve_core.postprocess import (
    ConceptOutput,
    PointOutput,
    encode_segmentation,
    finish_segmentation,
    unpack_segmentation,
)
from sam3_serve_core.polygons import mask_polygons

HEIGHT, WIDTH, LOW_RES, QUERIES = 37, 53, 16, 12
SIZE = (HEIGHT, WIDTH)


def concept_output(seed: int, kept: int, threshold: float = 0.5) -> ConceptOutput:
    """`QUERIES` queries of which `kept` score above `threshold`, at random places among them."""
    rng = np.random.default_rng(seed)
    scores = np.concatenate([rng.uniform(0.51, 1, size=kept), rng.uniform(0, 0.5, size=QUERIES - kept)])
    rng.shuffle(scores)
    corners = np.sort(rng.uniform(0, 1, size=(QUERIES, 2, 2)), axis=1).reshape(QUERIES, 4)
    return ConceptOutput(
        scores=torch.tensor(scores, dtype=torch.float32),
        boxes=torch.tensor(corners[:, [0, 2, 1, 3]], dtype=torch.float32),
        mask_logits=torch.tensor(rng.normal(0, 3, size=(QUERIES, LOW_RES, LOW_RES)), dtype=torch.float32),
        score_threshold=threshold,
    )


def point_output(seed: int) -> PointOutput:
    rng = np.random.default_rng(seed)
    logits = torch.tensor(rng.normal(0, 3, size=(1, LOW_RES, LOW_RES)), dtype=torch.float32)
    return PointOutput(mask_logits=logits, iou_score=torch.tensor(0.9))


def finish(outputs, chunk_pixels: int = 10**9, **options):
    return unpack_segmentation(finish_segmentation(outputs, SIZE, chunk_pixels=chunk_pixels, **options))


def test_one_prompt_is_transformers_steps_on_its_kept_queries_in_score_order():
    output = concept_output(1, kept=5)
    result = finish([output])
    kept = output.scores > 0.5
    order = torch.sort(output.scores[kept], descending=True, stable=True).indices
    np.testing.assert_array_equal(result.scores, output.scores[kept][order].numpy())
    np.testing.assert_array_equal(result.boxes, scale_boxes(output.boxes[kept][order], HEIGHT, WIDTH).numpy())
    expected = concept_masks_to_uint8(output.mask_logits[kept][order], HEIGHT, WIDTH, chunk_size=2)
    np.testing.assert_array_equal(result.masks, expected)
    assert result.masks.any() and not result.masks.all(), "the fixture's masks are neither empty nor full"
    np.testing.assert_array_equal(result.union_mask, expected.max(axis=0))


def test_instances_of_all_prompts_are_merged_sorted_and_labelled():
    outputs = [concept_output(1, 3), concept_output(2, 0), concept_output(3, 4)]
    result = finish(outputs)
    assert list(result.scores) == sorted(result.scores, reverse=True)
    assert sorted(result.labels.tolist()) == [0, 0, 0, 2, 2, 2, 2]
    for label, output in ((0, outputs[0]), (2, outputs[2])):
        alone = finish([output])
        np.testing.assert_array_equal(result.masks[result.labels == label], alone.masks)
        np.testing.assert_array_equal(result.scores[result.labels == label], alone.scores)
        np.testing.assert_array_equal(result.boxes[result.labels == label], alone.boxes)
    np.testing.assert_array_equal(result.union_mask, result.masks.max(axis=0))


def test_each_prompt_keeps_above_its_own_threshold():
    low, high = concept_output(4, kept=6, threshold=0.2), concept_output(5, kept=6, threshold=0.9)
    result = finish([low, high])
    for label, output in enumerate((low, high)):
        assert (result.labels == label).sum() == int((output.scores > output.score_threshold).sum())


@pytest.mark.parametrize("max_instances", [1, 3, 7, 100])
def test_max_instances_keeps_the_best_and_the_union_covers_only_them(max_instances):
    outputs = [concept_output(6, 4), concept_output(7, 3)]
    every = finish(outputs)
    best = finish(outputs, max_instances=max_instances)
    count = min(max_instances, len(every.scores))
    assert len(best.scores) == count
    np.testing.assert_array_equal(best.scores, every.scores[:count])
    np.testing.assert_array_equal(best.boxes, every.boxes[:count])
    np.testing.assert_array_equal(best.labels, every.labels[:count])
    np.testing.assert_array_equal(best.masks, every.masks[:count])
    np.testing.assert_array_equal(best.union_mask, every.masks[:count].max(axis=0))


@pytest.mark.parametrize("chunk_pixels", [1, HEIGHT * WIDTH * 2, 10**9])
def test_the_answer_is_the_same_whatever_the_chunk(chunk_pixels):
    outputs = [concept_output(8, 5), concept_output(9, 3), point_output(10)]
    whole = finish(outputs)
    chunked = finish(outputs, chunk_pixels=chunk_pixels)
    for name in ("union_mask", "masks", "scores", "boxes", "labels"):
        np.testing.assert_array_equal(getattr(chunked, name), getattr(whole, name))


@pytest.mark.parametrize("chunk_pixels", [1, HEIGHT * WIDTH * 2, 10**9])
def test_rle_of_the_packed_masks_equals_the_arrays_whatever_the_chunk(chunk_pixels):
    packed = finish_segmentation([concept_output(11, 5), concept_output(12, 3)], SIZE, chunk_pixels=10**9)
    arrays = unpack_segmentation(packed)
    encoded = encode_segmentation(packed, chunk_pixels)
    np.testing.assert_array_equal(np.stack([decode_mask(mask) for mask in encoded.masks]), arrays.masks)
    np.testing.assert_array_equal(decode_mask(encoded.union_mask), arrays.union_mask)
    np.testing.assert_array_equal(encoded.scores, arrays.scores)
    np.testing.assert_array_equal(encoded.boxes, arrays.boxes)
    np.testing.assert_array_equal(encoded.labels, arrays.labels)


@pytest.mark.parametrize("chunk_pixels", [1, 10**9])
def test_polygons_outline_each_unpacked_mask_and_the_union_when_asked(chunk_pixels):
    packed = finish_segmentation([concept_output(15, 5), point_output(16)], SIZE, chunk_pixels=10**9)
    arrays = unpack_segmentation(packed)
    outlined = encode_segmentation(packed, chunk_pixels, polygon_tolerance=1.0)
    assert outlined.polygons == [mask_polygons(mask, 1.0) for mask in arrays.masks]
    assert outlined.union_polygons == mask_polygons(arrays.union_mask, 1.0)
    assert any(outlined.polygons), "no outline at all: the comparison would say little"
    plain = encode_segmentation(packed, chunk_pixels)
    assert plain.polygons is None and plain.union_polygons is None and plain.masks == outlined.masks


def test_union_only_sends_no_instances():
    outputs = [concept_output(13, 4)]
    packed = finish_segmentation(outputs, SIZE, chunk_pixels=10**9, with_instances=False)
    assert packed.masks.shape == (0, (HEIGHT * WIDTH + 7) // 8)
    assert len(packed.scores) == len(packed.boxes) == len(packed.labels) == 0
    np.testing.assert_array_equal(unpack_segmentation(packed).union_mask, finish(outputs).union_mask)


def test_a_point_prompt_gives_its_object_as_the_union_and_no_instances():
    point = point_output(14)
    result = finish([point], chunk_pixels=1)
    assert result.masks.shape == (0, HEIGHT, WIDTH)
    expected = tracker_masks_to_uint8(point.mask_logits, HEIGHT, WIDTH, chunk_size=1)[0]
    assert 0 < np.count_nonzero(expected) < HEIGHT * WIDTH
    np.testing.assert_array_equal(result.union_mask, expected)


def test_no_instances_give_an_empty_union_of_the_image_size():
    packed = finish_segmentation([concept_output(15, 0)], SIZE, chunk_pixels=100)
    encoded = encode_segmentation(packed, 100)
    assert encoded.union_mask.size == SIZE and encoded.masks == []
    assert not decode_mask(encoded.union_mask).any()


def test_a_packed_answer_is_a_bit_per_pixel():
    packed = finish_segmentation([concept_output(16, 6)], (480, 640), chunk_pixels=10**9)
    assert packed.masks.shape == (6, 480 * 640 // 8) and packed.masks.dtype == np.uint8
    float32_logits = 6 * 288 * 288 * 4  # what crossed to the postprocessor before masks were finished on the device
    assert packed.masks.nbytes == 6 * 38_400 and packed.masks.nbytes * 8 < float32_logits


@pytest.mark.parametrize("size", [(1, 1), (3, 5), (8, 8), (37, 53)])
def test_packing_round_trips_in_column_major_order(size):
    height, width = size
    binary = torch.rand(4, height, width, generator=torch.Generator().manual_seed(height * width)) > 0.5
    packed = pack_masks(binary).numpy()
    columns = binary.transpose(1, 2).reshape(4, -1)
    np.testing.assert_array_equal(packed, np.packbits(columns.numpy(), axis=1))
    np.testing.assert_array_equal(pack_bits_on_device(columns).numpy(), packed)  # the GPU's way, run on the CPU
    columns = unpack_masks(packed, height, width)
    assert columns.shape == (height, width, 4) and columns.flags.f_contiguous
    np.testing.assert_array_equal(columns.transpose(2, 0, 1), binary.numpy())
