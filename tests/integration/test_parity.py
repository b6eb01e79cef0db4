"""Parity with transformers' own pipeline, on the tiny checkpoint at two resolutions.

The reference is what a transformers user runs: `Sam3Processor` -> `Sam3Model` ->
`post_process_instance_segmentation(threshold=0.5, mask_threshold=0.5)` sorted by score, and
`Sam3TrackerProcessor` -> `Sam3TrackerModel` -> `post_process_masks` for points (the best of three masks
for one point, `multimask_output=False` for several). The reference models are loaded on their own, each
with its own ViT, so the test also checks that sharing one ViT between the two heads changes nothing.

One prompt alone is the same computation as transformers' (one image, one prompt, a batch of one), so boxes
must be within 1e-3 px and scores within 1e-5 (they are in fact bit-identical), and masks identical but at a
pixel whose resized probability sits on the 0.5 threshold to within 1e-5: the CPU's resize kernel gives a
mask's last bit by its place among the masks resized together, and transformers resizes the kept masks in
query order, we in score order. Several
prompts in one request, or items batched together, run as a batch: those agree within the bounds that hold
across batch compositions (`tests/answers.py`). Every pipeline here is new, with no text encoding cached
from another batch. The tiny checkpoint's masks are meaningless (random weights); only their agreement
matters.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Sam3Model, Sam3Processor, Sam3TrackerModel, Sam3TrackerProcessor

from sam3_serve_core.checkpoint import load_sam3
from sam3_serve_core.pipeline import Sam3Pipeline
from sam3_serve_core.postprocess import finish_segmentation, unpack_segmentation
from sam3_serve_core.runner import Sam3Runner
from tests.answers import SCORE_TOLERANCE as BATCH_SCORE_TOLERANCE
from tests.answers import RESIZED_VALUE_TOLERANCE, Answer, Expected, assert_close_answer, expect
from tests.conftest import random_image

BOX_TOLERANCE_PX = 1e-3
SCORE_TOLERANCE = 1e-5


@lru_cache(maxsize=None)
def reference_models(checkpoint: str):
    return (
        Sam3Processor.from_pretrained(checkpoint),
        Sam3Model.from_pretrained(checkpoint).eval(),
        Sam3TrackerProcessor.from_pretrained(checkpoint),
        Sam3TrackerModel.from_pretrained(checkpoint).eval(),
    )


@lru_cache(maxsize=None)
def models_for(checkpoint: str):
    return load_sam3(checkpoint)


def pipeline_for(checkpoint: str) -> Sam3Pipeline:
    """A new pipeline (its own, empty text cache) on the checkpoint's models, loaded once.

    Its mask budget holds every mask at once: that is transformers' own resize call. A smaller budget resizes
    a few masks at a time, which may move a pixel that sits on the threshold (`sam3_serve_core.masks`)."""
    return Sam3Pipeline(models_for(checkpoint), score_threshold=0.5, mask_chunk_pixels=10**9)


@torch.inference_mode()
def reference_concept(checkpoint: str, image: np.ndarray, threshold: float = 0.5, **inputs) -> dict:
    processor, model, _, _ = reference_models(checkpoint)
    encoded = processor(images=Image.fromarray(image), return_tensors="pt", **inputs)
    outputs = model(**encoded)
    result = processor.post_process_instance_segmentation(
        outputs, threshold=threshold, mask_threshold=0.5, target_sizes=encoded["original_sizes"].tolist()
    )[0]
    order = torch.sort(result["scores"], descending=True, stable=True).indices
    masks = (result["masks"][order].numpy() * 255).astype(np.uint8)
    kept = (outputs.pred_logits.sigmoid() * outputs.presence_logits.sigmoid())[0] > threshold
    probabilities = torch.nn.functional.interpolate(
        outputs.pred_masks[0][kept].double().sigmoid()[None], size=image.shape[:2], mode="bilinear", align_corners=False
    )[0]
    return {
        "on_threshold": ((probabilities - 0.5).abs() <= RESIZED_VALUE_TOLERANCE)[order].numpy(),
        "scores": result["scores"][order].numpy(),
        "boxes": result["boxes"][order].numpy(),
        "masks": masks,
        "union_mask": masks.max(axis=0) if len(masks) else np.zeros(image.shape[:2], np.uint8),
    }


@torch.inference_mode()
def reference_points(checkpoint: str, image: np.ndarray, points, labels) -> np.ndarray:
    _, _, processor, model = reference_models(checkpoint)
    encoded = processor(
        images=Image.fromarray(image), input_points=[[points]], input_labels=[[labels]], return_tensors="pt"
    )
    single_point = len(points) == 1
    outputs = model(**encoded, multimask_output=single_point)
    masks = processor.post_process_masks(outputs.pred_masks, encoded["original_sizes"])[0][0]
    best = int(outputs.iou_scores[0, 0].argmax()) if single_point else 0
    return masks[best].numpy().astype(np.uint8) * 255


def image_shapes(size: int) -> list[tuple[int, int]]:
    """Non-square and larger, smaller than the model, and exactly the model size."""
    return [(90, 130), (size // 2 + 3, size // 2 - 5), (size, size)]


def prompt_cases(height: int, width: int) -> dict[str, dict]:
    """Our API's keyword arguments for each prompt kind, scaled to the image."""
    def box(x0, y0, x1, y1):
        return [x0 * width, y0 * height, x1 * width, y1 * height]

    return {
        "text": {"text": "a red car"},
        "one_box": {"boxes": [box(0.1, 0.15, 0.55, 0.7)], "labels": [1]},
        "boxes_mixed_labels": {
            "boxes": [box(0.1, 0.15, 0.55, 0.7), box(0.5, 0.2, 0.95, 0.9), box(0.3, 0.6, 0.6, 0.95)],
            "labels": [1, 0, 1],
        },
        "one_point": {"points": [[0.4 * width, 0.55 * height]], "labels": [1]},
        "points_mixed_labels": {
            "points": [[0.4 * width, 0.55 * height], [0.8 * width, 0.2 * height], [0.1 * width, 0.9 * height]],
            "labels": [1, 0, 1],
        },
    }


def reference_for(checkpoint: str, image: np.ndarray, case: dict, threshold: float = 0.5) -> dict:
    if "text" in case:
        return reference_concept(checkpoint, image, threshold=threshold, text=case["text"])
    if "boxes" in case:
        return reference_concept(
            checkpoint, image, threshold=threshold, input_boxes=[case["boxes"]], input_boxes_labels=[case["labels"]]
        )
    union = reference_points(checkpoint, image, case["points"], case["labels"])
    empty = np.zeros((0,), np.float32)
    return {"scores": empty, "boxes": empty.reshape(0, 4), "masks": np.zeros((0, *union.shape), np.uint8), "union_mask": union}


def assert_same_segmentation(ours, reference: dict) -> None:
    assert ours.scores.shape == reference["scores"].shape, "different number of instances"
    np.testing.assert_allclose(ours.scores, reference["scores"], rtol=0, atol=SCORE_TOLERANCE)
    np.testing.assert_allclose(ours.boxes, reference["boxes"], rtol=0, atol=BOX_TOLERANCE_PX)
    on_threshold = reference.get("on_threshold", np.zeros(reference["masks"].shape, bool))
    np.testing.assert_array_equal(ours.masks[~on_threshold], reference["masks"][~on_threshold])
    union_off_threshold = ~on_threshold.any(axis=0) if len(on_threshold) else slice(None)
    np.testing.assert_array_equal(ours.union_mask[union_off_threshold], reference["union_mask"][union_off_threshold])
    assert ours.union_mask.dtype == np.uint8 and set(np.unique(ours.union_mask)) <= {0, 255}
    assert np.all(np.diff(ours.scores) <= 0), "scores must be sorted in descending order"


@pytest.mark.parametrize("shape_index", [0, 1, 2], ids=["non_square", "smaller_than_model", "at_model_size"])
@pytest.mark.parametrize("kind", ["text", "one_box", "boxes_mixed_labels", "one_point", "points_mixed_labels"])
def test_matches_transformers_pipeline(tiny_dir, shape_index, kind):
    checkpoint = str(tiny_dir)
    pipeline = pipeline_for(checkpoint)
    height, width = image_shapes(pipeline.models.geometry.image_size)[shape_index]
    image = random_image(height, width, seed=shape_index)
    case = prompt_cases(height, width)[kind]
    ours = pipeline.segment(image, **case)
    assert_same_segmentation(ours, reference_for(checkpoint, image, case))
    assert ours.union_mask.shape == (height, width)
    if kind in ("text", "one_box", "boxes_mixed_labels"):
        # The tiny checkpoint is calibrated so some queries pass the threshold; an empty answer tests little.
        assert len(ours.scores) > 0


def test_mixed_batch_matches_items_alone(tiny_dir):
    """One model pass over mixed images and prompt types gives each item's answer alone, in order."""
    checkpoint = str(tiny_dir)
    pipeline = pipeline_for(checkpoint)
    items, expected = [], []
    for index, (height, width) in enumerate(image_shapes(pipeline.models.geometry.image_size)):
        image = random_image(height, width, seed=10 + index)
        for kind, case in prompt_cases(height, width).items():
            items.append(pipeline.prepare(image, **case))
            expected.append(expect(pipeline_for(checkpoint), image, **case))
    # Two prompts of the same text on different images, and a second text: texts are deduplicated.
    items.append(pipeline.prepare(random_image(70, 40, seed=3), text="a red car"))
    expected.append(expect(pipeline_for(checkpoint), random_image(70, 40, seed=3), text="a red car"))
    items.append(pipeline.prepare(random_image(70, 40, seed=3), text="dog"))
    expected.append(expect(pipeline_for(checkpoint), random_image(70, 40, seed=3), text="dog"))

    batched = pipeline.segment_batch(items)
    assert len(batched) == len(items)
    for ours, alone in zip(batched, expected):
        # A batch runs other kernels than one item alone: the same answer within the stated bounds.
        assert_close_answer(ours, alone)
    assert sum(alone.at_threshold().instances for alone in expected) > 0, "instances were compared"


def test_several_prompts_on_one_image_share_its_vision_pass(tiny112_dir):
    """The ViT runs once per image, and the text encoder once per distinct text, whatever the prompts."""
    pipeline = pipeline_for(str(tiny112_dir))
    runner = Sam3Runner(pipeline.models, score_threshold=0.5)  # its own text cache: every text is new to it
    detector = pipeline.models.detector
    backbone_batches, text_batches = [], []
    hooks = [
        detector.vision_encoder.backbone.register_forward_hook(
            lambda module, args, output: backbone_batches.append(args[0].shape[0])
        ),
        detector.text_encoder.register_forward_hook(
            lambda module, args, kwargs, output: text_batches.append(kwargs["input_ids"].shape[0]), with_kwargs=True
        ),
    ]
    try:
        images = [random_image(60, 80, seed=1), random_image(100, 50, seed=2)]
        items = []
        for image in images:
            item = pipeline.prepare(image, text="cat")
            for case in ({"text": "dog"}, {"boxes": [[5, 5, 40, 30]], "labels": [1]}, {"points": [[20, 20]], "labels": [1]}):
                item.prompts.extend(pipeline.prepare(image, **case).prompts)
            items.append(item)
        outputs = runner.forward(items)
    finally:
        for hook in hooks:
            hook.remove()
    assert backbone_batches == [2], "one backbone pass for the two images"
    assert sorted(text_batches) == [1, 2], "'cat' and 'dog' together, then 'visual' for the boxes"
    assert [len(per_item) for per_item in outputs] == [4, 4]
    alone = expect(pipeline_for(str(tiny112_dir)), images[1], text="dog")
    dog = unpack_segmentation(
        finish_segmentation([outputs[1][1]], items[1].original_size, chunk_pixels=pipeline.mask_chunk_pixels)
    )
    assert_close_answer(dog, alone)  # answered in a batch of two images: within the bounds, not bit for bit
    assert alone.at_threshold().instances > 0


def expected_from_references(references: list[dict], threshold: float) -> Expected:
    """Transformers' answers to each prompt alone (made with the threshold lowered by the tolerance), as one
    answer whose labels say which prompt each instance answers."""
    masks = np.concatenate([reference["masks"] for reference in references])
    return Expected(
        Answer(
            union_mask=np.maximum.reduce([reference["union_mask"] for reference in references]) > 0,
            masks=masks > 0 if len(masks) else None,
            scores=np.concatenate([reference["scores"] for reference in references]).astype(np.float64),
            boxes=np.concatenate([reference["boxes"] for reference in references]).astype(np.float64),
            labels=np.concatenate([np.full(len(ref["scores"]), label) for label, ref in enumerate(references)]),
        ),
        threshold,
    )


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.8])
def test_several_texts_with_a_threshold_match_one_transformers_call_per_text(tiny_dir, threshold):
    checkpoint = str(tiny_dir)
    pipeline = pipeline_for(checkpoint)
    image = random_image(90, 130, seed=5)
    texts = ["a red car", "dog", "a red car on a road", "cat"]
    ours = pipeline.segment(image, text=texts, score_threshold=threshold)
    lowered = threshold - BATCH_SCORE_TOLERANCE
    references = [reference_concept(checkpoint, image, threshold=lowered, text=text) for text in texts]
    # The texts run as one batch of four, transformers' one by one: within the bounds, not bit for bit.
    assert_close_answer(ours, expected_from_references(references, threshold))
    assert np.all(np.diff(ours.scores) <= 0), "scores sorted over all prompts together"
    assert len(ours.scores) > 0


def test_several_box_sets_match_one_transformers_call_per_set(tiny_dir):
    checkpoint = str(tiny_dir)
    pipeline = pipeline_for(checkpoint)
    height, width = 90, 130
    image = random_image(height, width, seed=6)
    cases = [prompt_cases(height, width)[kind] for kind in ("one_box", "boxes_mixed_labels")]
    ours = pipeline.segment(image, box_sets=[(case["boxes"], case["labels"]) for case in cases])
    lowered = 0.5 - BATCH_SCORE_TOLERANCE
    references = [reference_for(checkpoint, image, case, threshold=lowered) for case in cases]
    assert_close_answer(ours, expected_from_references(references, 0.5))  # the two sets run as one batch
    assert len(ours.scores) > 0


def test_a_cached_text_encoding_gives_the_same_answer(tiny112_dir):
    """The second request for a text skips the text encoder and answers the same."""
    pipeline = pipeline_for(str(tiny112_dir))
    runner = Sam3Runner(pipeline.models, score_threshold=0.5)
    encoder_calls = []
    hook = pipeline.models.detector.text_encoder.register_forward_hook(lambda *args: encoder_calls.append(1))
    try:
        image = random_image(60, 80, seed=9)
        first, second = (runner.forward([pipeline.prepare(image, text="a cached concept")])[0][0] for _ in range(2))
    finally:
        hook.remove()
    assert len(encoder_calls) == 1
    assert torch.equal(first.scores, second.scores)
    assert torch.equal(first.mask_logits, second.mask_logits)
