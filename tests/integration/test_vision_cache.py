"""The vision-feature cache in the model runner: an answer from a warm cache is bit-identical to the cold one.

On the tiny checkpoint (random weights: its masks are meaningless, only the agreement matters), with a score
threshold low enough that every concept query is kept, so every query's score, box and mask is compared.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client.errors import ImageNotCachedError
from sam3_serve_core.checkpoint import load_sam3
from sam3_serve_core.messages import PreparedItem
from sam3_serve_core.pipeline import prepare_item
from sam3_serve_core.postprocess import ConceptOutput
from sam3_serve_core.runner import Sam3Runner
from tests.answers import LOGIT_TOLERANCE
from tests.conftest import random_image

KEEP_EVERY_QUERY = 1e-9
CHECKPOINT = "tiny-test"
PROMPTS = {
    "text": {"text": "cat"},
    "texts": {"text": ["cat", "striped dog"]},
    "boxes": {"boxes": [[5, 10, 40, 50]], "labels": [1]},
    "box_sets": {"box_sets": [{"boxes": [[5, 10, 40, 50]], "labels": [1]}, {"boxes": [[30, 5, 70, 55]], "labels": [0]}]},
    "point": {"points": [[30, 20]], "labels": [1]},
    "points": {"points": [[30, 20], [60, 40]], "labels": [1, 0]},
}


@pytest.fixture(scope="module")
def models(tiny112_dir):
    return load_sam3(str(tiny112_dir))


def runner_for(models, vision_cache_bytes: int) -> Sam3Runner:
    return Sam3Runner(models, KEEP_EVERY_QUERY, vision_cache_bytes=vision_cache_bytes)


def item(models, image: np.ndarray | None, image_id: str | None = None, **prompt) -> PreparedItem:
    return prepare_item(
        image, tokenizer=models.tokenizer, geometry=models.geometry, image_id=image_id, checkpoint=CHECKPOINT, **prompt
    )


def assert_identical(first, second) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert type(a) is type(b)
        assert torch.equal(a.mask_logits, b.mask_logits)
        if isinstance(a, ConceptOutput):
            assert (a.scores > a.score_threshold).any()
            assert torch.equal(a.scores, b.scores) and torch.equal(a.boxes, b.boxes)
        else:
            assert torch.equal(a.iou_score, b.iou_score)


@pytest.mark.parametrize("prompt", PROMPTS.values(), ids=PROMPTS.keys())
def test_a_warm_cache_answers_exactly_as_the_cold_one_and_as_no_cache(models, prompt):
    image = random_image(60, 80, seed=3)
    runner = runner_for(models, 10**9)
    cold = runner.forward([item(models, image, **prompt)])[0]
    assert runner.vision_cache.stats().misses == 1 and runner.vision_cache.stats().hits == 0
    first = item(models, image, **prompt)
    warm_with_pixels = runner.forward([first])[0]
    warm_by_id = runner.forward([item(models, None, image_id=first.image_key, **prompt)])[0]
    assert runner.vision_cache.stats().hits == 2 and runner.vision_cache.stats().misses == 1
    uncached = runner_for(models, 0).forward([item(models, image, **prompt)])[0]
    for answer in (warm_with_pixels, warm_by_id, uncached):
        assert_identical(cold, answer)


def test_a_warm_answer_in_a_mixed_batch_equals_the_same_batch_cold(models):
    """Hits and misses in one batch: the cached images' features join the ViT's output for the rest."""
    images = [random_image(60, 80, seed=seed) for seed in (4, 5)]
    batch = [
        item(models, images[0], **PROMPTS["text"]),
        item(models, images[1], **PROMPTS["point"]),
        item(models, images[0], **PROMPTS["boxes"]),
    ]
    cold = runner_for(models, 0).forward(batch)
    runner = runner_for(models, 10**9)
    runner.run([item(models, images[0], **PROMPTS["text"])])
    warm = runner.forward(batch)
    stats = runner.vision_cache.stats()
    # Counted per request: images[0] missed alone, then hit twice; images[1] missed.
    assert (stats.hits, stats.misses, stats.images_held) == (2, 2, 2)
    for cold_answer, warm_answer in zip(cold, warm):
        # images[0] was encoded alone, then batched with images[1]: batch kernels differ in the last bits.
        assert (warm_answer[0].mask_logits - cold_answer[0].mask_logits).abs().max() <= LOGIT_TOLERANCE


def test_the_same_new_image_twice_in_a_batch_is_encoded_once(models):
    image = random_image(60, 80, seed=6)
    runner = runner_for(models, 10**9)
    runner.run([item(models, image, **PROMPTS["text"]), item(models, image, **PROMPTS["point"])])
    stats = runner.vision_cache.stats()
    assert (stats.misses, stats.hits, stats.images_held) == (1, 1, 1)  # the second shares the first's encoding


def test_an_answer_says_whether_its_image_went_through_the_vit(models):
    """`timings_ms["vision"]`: the ViT pass's time for an image encoded in the batch, 0 for one from the cache
    (by its pixels or by its id alone); items encoded in one pass share its time."""
    images = [random_image(60, 80, seed=seed) for seed in (10, 11)]
    runner = runner_for(models, 10**9)
    cold = [item(models, image, **PROMPTS["text"]) for image in images]
    runner.run(cold)
    assert cold[0].timings_ms["vision"] > 0 and cold[0].timings_ms["vision"] == cold[1].timings_ms["vision"]
    warm_by_id = item(models, None, image_id=cold[0].image_key, **PROMPTS["point"])
    warm_with_pixels = item(models, images[1], **PROMPTS["boxes"])
    new = item(models, random_image(60, 80, seed=12), **PROMPTS["text"])
    runner.run([warm_by_id, warm_with_pixels, new])
    assert warm_by_id.timings_ms["vision"] == warm_with_pixels.timings_ms["vision"] == 0
    assert new.timings_ms["vision"] > 0
    uncached = item(models, images[0], **PROMPTS["text"])
    runner_for(models, 0).run([uncached])
    assert uncached.timings_ms["vision"] > 0, "without a cache every image goes through the ViT"


def test_the_cache_keeps_to_its_byte_budget_least_recently_used_first(models):
    images = [random_image(60, 80, seed=seed) for seed in (7, 8, 9)]
    probe = runner_for(models, 10**9)
    probe.run([item(models, images[0], **PROMPTS["text"])])
    one_image = probe.vision_cache.stats().bytes_held
    assert one_image == probe.image_feature_bytes > 0
    runner = runner_for(models, 2 * one_image)
    ids = []
    for image in images[:2]:
        prepared = item(models, image, **PROMPTS["text"])
        runner.run([prepared])
        ids.append(prepared.image_key)
    runner.run([item(models, None, image_id=ids[0], **PROMPTS["text"])])  # images[0] is now the most recent
    runner.run([item(models, images[2], **PROMPTS["text"])])
    stats = runner.vision_cache.stats()
    assert (stats.images_held, stats.bytes_held, stats.evictions) == (2, 2 * one_image, 1)
    assert ids[0] in runner.vision_cache and ids[1] not in runner.vision_cache
    with pytest.raises(ImageNotCachedError):
        runner.run([item(models, None, image_id=ids[1], **PROMPTS["text"])])


def test_an_image_id_without_a_cache_is_a_typed_error(models):
    prepared = item(models, random_image(60, 80, seed=10), **PROMPTS["text"])
    with pytest.raises(ImageNotCachedError):
        runner_for(models, 0).run([item(models, None, image_id=prepared.image_key, **PROMPTS["text"])])
