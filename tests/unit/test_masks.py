"""sam3_serve_core.masks must reproduce transformers' SAM 3 post-processing bit for bit."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers.models.sam3.image_processing_sam3 import Sam3ImageProcessor

from sam3_serve_core.masks import (
    concept_masks_to_uint8,
    concept_scores,
    keep_above,
    order_by_score_descending,
    scale_boxes,
    tracker_masks_to_uint8,
)
from tests.answers import assert_same_masks_off_threshold

NUM_QUERIES = 24
LOW_RES = (32, 40)
TARGET_SIZES = [(37, 53), (300, 200), (16, 16), (32, 40), (64, 64)]
MASK_FUNCTIONS = [concept_masks_to_uint8, tracker_masks_to_uint8]


def _random_outputs(seed: int) -> SimpleNamespace:
    generator = torch.Generator().manual_seed(seed)
    pred_logits = torch.randn(1, NUM_QUERIES, generator=generator) * 3.0
    boxes = torch.rand(1, NUM_QUERIES, 4, generator=generator)
    pred_boxes = torch.cat([boxes[..., :2] * 0.5, 0.5 + boxes[..., 2:] * 0.5], dim=-1)
    pred_masks = torch.randn(1, NUM_QUERIES, *LOW_RES, generator=generator) * 4.0
    presence_logits = torch.tensor([[1.5]])
    return SimpleNamespace(
        pred_logits=pred_logits,
        pred_boxes=pred_boxes,
        pred_masks=pred_masks,
        presence_logits=presence_logits,
    )


def _random_logits(num_masks: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_masks, *LOW_RES, generator=generator) * 4.0


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("target_size", TARGET_SIZES)
def test_concept_path_matches_transformers_instance_segmentation(seed, target_size):
    outputs = _random_outputs(seed)
    height, width = target_size
    expected = Sam3ImageProcessor().post_process_instance_segmentation(
        outputs, threshold=0.5, mask_threshold=0.5, target_sizes=[target_size]
    )[0]

    scores = concept_scores(outputs.pred_logits[0], outputs.presence_logits[0])
    keep = keep_above(scores, 0.5)
    assert 0 < int(keep.sum()) < NUM_QUERIES, "fixture must keep some queries and drop others"

    assert torch.equal(scores[keep], expected["scores"])
    assert torch.equal(scale_boxes(outputs.pred_boxes[0][keep], height, width), expected["boxes"])
    masks = concept_masks_to_uint8(outputs.pred_masks[0][keep], height, width, chunk_size=3)
    assert np.array_equal(masks, expected["masks"].numpy().astype(np.uint8) * 255)


def test_concept_scores_accepts_scalar_presence_logit():
    outputs = _random_outputs(0)
    with_vector = concept_scores(outputs.pred_logits[0], outputs.presence_logits[0])
    with_scalar = concept_scores(outputs.pred_logits[0], outputs.presence_logits[0, 0])
    assert with_scalar.shape == (NUM_QUERIES,)
    assert torch.equal(with_vector, with_scalar)


def test_keep_above_is_strict():
    scores = torch.tensor([0.4, 0.5, 0.6])
    assert keep_above(scores, 0.5).tolist() == [False, False, True]


def test_scale_boxes_keeps_float32():
    boxes = torch.rand(5, 4)
    assert scale_boxes(boxes, 300, 200).dtype == torch.float32


@pytest.mark.parametrize("target_size", TARGET_SIZES)
def test_tracker_path_matches_transformers_post_process_masks(target_size):
    height, width = target_size
    logits = _random_logits(7)
    # The tracker's per-image masks are (num_objects, num_masks=1, h, w).
    expected = Sam3ImageProcessor().post_process_masks([logits.unsqueeze(1)], [target_size])[0]

    masks = tracker_masks_to_uint8(logits, height, width, chunk_size=3)
    assert np.array_equal(masks, expected.squeeze(1).numpy().astype(np.uint8) * 255)


@pytest.mark.parametrize("to_uint8", MASK_FUNCTIONS)
@pytest.mark.parametrize("target_size", [(37, 53), (300, 200)])
def test_chunking_by_channel_moves_only_pixels_on_the_threshold(to_uint8, target_size):
    height, width = target_size
    logits = _random_logits(10)
    outputs = [to_uint8(logits, height, width, chunk_size=size) for size in (1, 3, 10, 64)]
    for other in outputs[1:]:
        assert_same_masks_off_threshold(outputs[0], other, logits, height, width, to_uint8)


@pytest.mark.parametrize("to_uint8", MASK_FUNCTIONS)
def test_output_is_uint8_zero_or_255(to_uint8):
    masks = to_uint8(_random_logits(5), 37, 53, chunk_size=2)
    assert masks.dtype == np.uint8
    assert masks.shape == (5, 37, 53)
    assert set(np.unique(masks).tolist()) == {0, 255}


@pytest.mark.parametrize("to_uint8", MASK_FUNCTIONS)
def test_no_masks_gives_an_empty_array(to_uint8):
    masks = to_uint8(torch.empty(0, *LOW_RES), 37, 53, chunk_size=4)
    assert masks.dtype == np.uint8
    assert masks.shape == (0, 37, 53)


@pytest.mark.parametrize("to_uint8", MASK_FUNCTIONS)
def test_chunk_size_must_be_positive(to_uint8):
    with pytest.raises(ValueError):
        to_uint8(_random_logits(2), 8, 8, chunk_size=0)


def test_order_by_score_descending_keeps_query_order_for_ties():
    scores = torch.tensor([0.5, 0.9, 0.5, 0.9, 0.1, 0.5])
    assert order_by_score_descending(scores).tolist() == [1, 3, 0, 2, 5, 4]


def test_order_by_score_descending_on_no_scores():
    assert order_by_score_descending(torch.empty(0)).tolist() == []


@pytest.mark.parametrize("to_uint8", MASK_FUNCTIONS)
def test_at_most_chunk_size_masks_are_resized_at_once(to_uint8, monkeypatch):
    seen_mask_counts = []
    original_interpolate = F.interpolate

    def recording_interpolate(input, *args, **kwargs):
        seen_mask_counts.append(input.shape[0] * input.shape[1])
        return original_interpolate(input, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "interpolate", recording_interpolate)
    masks = to_uint8(_random_logits(10), 300, 200, chunk_size=2)

    assert masks.shape == (10, 300, 200)
    assert seen_mask_counts == [2, 2, 2, 2, 2]
