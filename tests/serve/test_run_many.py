"""The bulk calls against the real application, through both clients: each answer equals the single call's.

Good images of different sizes, a corrupt file and a missing path go in together; the bad ones get their
`InvalidImageError` in their slot and the rest are answered, in input order.
"""

from __future__ import annotations

import numpy as np
import pytest

from client.errors import InvalidImageError
from tests.conftest import random_image

SIZES = [(90, 130), (64, 64), (120, 80), (33, 57), (100, 100)]
TEXTS = ["a red car", "dog", "cat"]  # several concepts and a low threshold, so there are instances to compare


@pytest.fixture
def images(tmp_path) -> list:
    """Five good images with a corrupt file in second place and a missing path in fifth."""
    good = [random_image(height, width, seed=index) for index, (height, width) in enumerate(SIZES)]
    return [good[0], b"\x89PNG\r\n\x1a\n not really a png", *good[1:3], str(tmp_path / "missing.png"), *good[3:]]


def is_bad(image) -> bool:
    return not isinstance(image, np.ndarray)


@pytest.mark.parametrize("client_name", ["http_client", "handle_client"])
def test_run_many_equals_run_image_by_image(request, client_name, images):
    client = request.getfixturevalue(client_name)
    results = client.run_many(images, text="a red car", concurrency=3)
    assert len(results) == len(images)
    for image, result in zip(images, results, strict=True):
        if is_bad(image):
            assert isinstance(result, InvalidImageError), result
            continue
        assert isinstance(result, np.ndarray) and result.shape == image.shape[:2]
        np.testing.assert_array_equal(result, client.run(image, text="a red car"))


@pytest.mark.parametrize("client_name", ["http_client", "handle_client"])
def test_run_many_with_detections_equals_run_with_detections(request, client_name, images):
    client = request.getfixturevalue(client_name)
    results = client.run_many_with_detections(images, text=TEXTS, score_threshold=0.3, concurrency=4)
    instances = 0
    for image, result in zip(images, results, strict=True):
        if is_bad(image):
            assert isinstance(result, InvalidImageError), result
            continue
        single = client.run_with_detections(image, text=TEXTS, score_threshold=0.3)
        assert list(result) == list(single)
        np.testing.assert_array_equal(result["union_mask"], single["union_mask"])
        assert result["union_mask"].shape == image.shape[:2]
        assert result["labels"] == single["labels"] and len(result["masks"]) == len(single["masks"])
        # Scores (and so boxes) may differ in the last float32 bit: the model runs a batch of a different size.
        np.testing.assert_allclose(result["scores"], single["scores"], rtol=0, atol=1e-5)
        np.testing.assert_allclose(np.reshape(result["boxes"], (-1, 4)), np.reshape(single["boxes"], (-1, 4)), atol=1e-3)
        for mask, single_mask in zip(result["masks"], single["masks"], strict=True):
            np.testing.assert_array_equal(mask, single_mask)
        instances += len(result["masks"])
    assert instances > 0, "no instances at all: the comparison would say little"


def test_the_two_clients_agree_on_a_bulk_call(http_client, handle_client, images):
    over_http = http_client.run_many(images, text="a red car", concurrency=8)
    over_handle = handle_client.run_many(images, text="a red car", concurrency=8)
    for a, b in zip(over_http, over_handle, strict=True):
        if isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, b)
        else:
            assert type(a) is type(b) is InvalidImageError
