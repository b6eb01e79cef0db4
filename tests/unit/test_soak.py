"""The soak's good prompts are valid for every image it makes, so that only a fault refuses a good request."""

from __future__ import annotations

import random

from benchmarks.soak import good_prompt, is_flat
from client.protocol import SegmentRequest
from sam3_serve_core.prompts import box_exemplars, scale_points


def test_the_soak_s_good_prompts_are_valid_for_every_image_size():
    rng = random.Random(0)
    kinds = set()
    for _ in range(2000):
        width, height = rng.randint(64, 599), rng.randint(64, 599)  # the sizes `SoakImage.random` makes
        prompt = good_prompt(rng, width, height)
        SegmentRequest(image=b"an image", **prompt)
        if "boxes" in prompt:
            box_exemplars(prompt["boxes"], prompt["labels"], height, width)
            assert all(0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height for x0, y0, x1, y1 in prompt["boxes"])
        if "points" in prompt:
            scale_points(prompt["points"], prompt["labels"], height, width, model_size=112)
            assert all(0 <= x < width and 0 <= y < height for x, y in prompt["points"])
        kinds.add(next(iter(prompt)))
    assert kinds == {"text", "boxes", "points"}


def test_a_replica_is_flat_when_its_growth_beyond_what_its_cache_filled_is_within_the_bound():
    assert is_flat(1000, 1100) and not is_flat(1000, 1120)  # the bound: 100 MB or 10% of the start
    assert is_flat(1000, 1120, cache_growth_mb=60)
    assert not is_flat(1000, 1300, cache_growth_mb=60)
    assert not is_flat(1000, 1120, cache_growth_mb=-50), "a cache that shrank grants nothing"
