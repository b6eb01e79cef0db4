"""The bulk calls against the real application, through both clients: each answer is the single call's.

Good images of different sizes, a corrupt file and a missing path go in together; the bad ones get their
`InvalidImageError` in their slot and the rest are answered, in input order. A bulk call's requests share
model batches, so every answer is held to the in-process pipeline within the bounds that hold across batch
compositions (`tests/answers.py`), not to another answer bit for bit.
"""

from __future__ import annotations

import asyncio
from functools import lru_cache

import numpy as np
import pytest

from client import AsyncSam3HttpClient
from client.errors import InvalidImageError
from sam3_serve_core.checkpoint import load_sam3
from sam3_serve_core.pipeline import Sam3Pipeline
from tests.answers import Expected, assert_close_answer, expect
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


@lru_cache(maxsize=1)
def in_process(checkpoint: str) -> Sam3Pipeline:
    return Sam3Pipeline(load_sam3(checkpoint))


def expected_for(checkpoint: str, image: np.ndarray, **prompt) -> Expected:
    expected = expect(in_process(checkpoint), image, **prompt)
    assert expected.at_threshold().union_mask.any(), "an empty expected mask would make the comparison say little"
    return expected


@pytest.mark.parametrize("client_name", ["http_client", "handle_client"])
def test_run_many_equals_run_image_by_image(request, client_name, images, tiny112_dir):
    client = request.getfixturevalue(client_name)
    results = client.run_many(images, text="a red car", concurrency=3)
    assert len(results) == len(images)
    for image, result in zip(images, results, strict=True):
        if is_bad(image):
            assert isinstance(result, InvalidImageError), result
            continue
        assert isinstance(result, np.ndarray) and result.shape == image.shape[:2]
        expected = expected_for(str(tiny112_dir), image, text="a red car")
        assert_close_answer(result, expected)
        # The client sends each image the bulk call sent as its `image_id`: the cached path.
        assert_close_answer(client.run(image, text="a red car"), expected)


@pytest.mark.parametrize("client_name", ["http_client", "handle_client"])
def test_run_many_with_detections_equals_run_with_detections(request, client_name, images, tiny112_dir):
    client = request.getfixturevalue(client_name)
    results = client.run_many_with_detections(images, text=TEXTS, score_threshold=0.3, concurrency=4)
    instances = 0
    for image, result in zip(images, results, strict=True):
        if is_bad(image):
            assert isinstance(result, InvalidImageError), result
            continue
        expected = expected_for(str(tiny112_dir), image, text=TEXTS, score_threshold=0.3)
        single = client.run_with_detections(image, text=TEXTS, score_threshold=0.3)  # by `image_id`: cached
        assert list(result) == list(single)
        assert result["union_mask"].shape == image.shape[:2]
        assert_close_answer(result, expected)
        assert_close_answer(single, expected)
        instances += len(result["masks"])
    assert instances > 0, "no instances at all: the comparison would say little"


def test_the_two_clients_agree_on_a_bulk_call(http_client, handle_client, images, tiny112_dir):
    """Both bulk calls go by `image_id` for images these clients sent before (the cached path), and by bytes
    for the others; either way each answer is within the bounds of the in-process one."""
    over_http = http_client.run_many(images, text="a red car", concurrency=8)
    over_handle = handle_client.run_many(images, text="a red car", concurrency=8)
    for image, a, b in zip(images, over_http, over_handle, strict=True):
        if isinstance(a, np.ndarray):
            expected = expected_for(str(tiny112_dir), image, text="a red car")
            assert_close_answer(a, expected)
            assert_close_answer(b, expected)
        else:
            assert type(a) is type(b) is InvalidImageError


def test_64_tasks_of_one_event_loop_get_the_blocking_clients_answers(app_url, http_client, tiny112_dir):
    """`AsyncSam3HttpClient` from 64 tasks at once in one event loop, against the blocking client's own answers:
    each image's two answers have the same keys and size and both are within the bounds of the in-process
    answer (the 64 requests share model batches, so bounds, not bits). Every request sends its bytes
    (`reuse_images=False`); repeats of an image may be answered from the service's vision-feature cache."""
    images = [random_image(60 + 5 * index, 100 - 3 * index, seed=200 + index) for index in range(16)]

    async def answers() -> list:
        async with AsyncSam3HttpClient(app_url, timeout=120, reuse_images=False) as client:
            calls = (client.run_with_detections(images[index % 16], text=TEXTS, score_threshold=0.3) for index in range(64))
            return await asyncio.gather(*calls)

    concurrent = asyncio.run(answers())
    blocking = [http_client.run_with_detections(image, text=TEXTS, score_threshold=0.3) for image in images]
    instances = 0
    for index, answer in enumerate(concurrent):
        image, alone = images[index % 16], blocking[index % 16]
        expected = expected_for(str(tiny112_dir), image, text=TEXTS, score_threshold=0.3)
        assert list(answer) == list(alone) and answer["union_mask"].shape == alone["union_mask"].shape
        assert_close_answer(answer, expected)
        assert_close_answer(alone, expected)
        instances += len(answer["masks"])
    assert instances > 0, "no instances at all: the comparison would say little"
