"""The vision-feature cache's bookkeeping and image ids, without a model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client.errors import InvalidRequestError
from client.protocol import SegmentRequest
from sam3_serve_core.vision_cache import ImageFeatures, VisionFeatureCache, image_key, original_size_of


def features(megabytes: int) -> ImageFeatures:
    """Features of `megabytes` MB (float32), split over one FPN level and the ViT output."""
    half = megabytes * 250_000 // 2
    return ImageFeatures((torch.zeros(1, half),), torch.zeros(1, half))


def test_an_image_id_names_the_pixels_the_checkpoint_and_the_original_size():
    pixels = np.arange(3 * 8 * 8, dtype=np.uint8).reshape(3, 8, 8)
    key = image_key(pixels, (480, 640), "facebook/sam3")
    assert key == image_key(pixels.copy(), (480, 640), "facebook/sam3")
    assert key.endswith("-480x640") and original_size_of(key) == (480, 640)
    changed = pixels.copy()
    changed[0, 0, 0] += 1
    others = {
        image_key(changed, (480, 640), "facebook/sam3"),
        image_key(pixels, (480, 641), "facebook/sam3"),
        image_key(pixels, (480, 640), "other/checkpoint"),
    }
    assert key not in others and len(others) == 3
    assert SegmentRequest(image_id=key, text="cat").image_id == key  # the wire format accepts what we make


@pytest.mark.parametrize("bad", ["", "abc-1x1", "0" * 32 + "-0x5", "0" * 32 + "-5x5-5x5", "G" * 32 + "-5x5"])
def test_a_malformed_image_id_is_refused(bad):
    with pytest.raises(InvalidRequestError):
        original_size_of(bad)


def test_least_recently_used_images_go_first_and_the_budget_holds():
    cache = VisionFeatureCache(max_bytes=3_000_000)
    for key in "abc":
        cache.put(key, features(1))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", features(1))
    assert "b" not in cache and all(key in cache for key in "acd")
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.evictions, stats.images_held, stats.bytes_held) == (1, 0, 1, 3, 3_000_000)
    assert cache.get("b") is None and cache.stats().misses == 1
    assert cache.get("b", requests=3) is None and (cache.stats().misses, cache.stats().hits) == (2, 3)
    assert cache.get("a", requests=2) is not None and cache.stats().hits == 5


def test_a_larger_entry_evicts_as_many_as_it_needs_and_one_over_the_budget_is_not_kept():
    cache = VisionFeatureCache(max_bytes=3_000_000)
    for key in "abc":
        cache.put(key, features(1))
    cache.put("big", features(2))
    assert [key in cache for key in ("a", "b", "c", "big")] == [False, False, True, True]
    cache.put("huge", features(4))
    assert "huge" not in cache and cache.stats().bytes_held == 3_000_000


def test_putting_a_held_image_again_replaces_it_without_counting_it_twice():
    cache = VisionFeatureCache(max_bytes=3_000_000)
    cache.put("a", features(1))
    cache.put("a", features(2))
    assert cache.stats().bytes_held == 2_000_000 and cache.stats().images_held == 1
