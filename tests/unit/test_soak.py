"""The soak's good prompts are valid for every image it makes, so that only a fault refuses a good request."""

from __future__ import annotations

import random

from benchmarks.soak import good_prompt
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
