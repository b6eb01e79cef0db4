"""Unit tests for sam3_serve_core.preprocess: bit-exact parity with transformers' `Sam3ImageProcessor`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Sam3ImageProcessor

from sam3_serve_core.preprocess import normalize, resize_to_model
from tests.conftest import TINY_SIZES, random_image

# (height, width) relative to S: larger, smaller, non-square both ways, mixed, tiny, and exactly S x S.
SHAPES = {
    "larger": lambda s: (3 * s + 5, 2 * s + 7),
    "smaller": lambda s: (s // 2 + 1, s // 3 + 2),
    "wide": lambda s: (s // 2, 4 * s),
    "tall": lambda s: (4 * s, s // 2),
    "mixed": lambda s: (2 * s, s - 9),
    "tiny": lambda s: (1, 2),
    "square_other": lambda s: (s + 1, s + 1),
    "exact": lambda s: (s, s),
}


@pytest.fixture(scope="module", params=TINY_SIZES, ids=lambda s: f"S{s}")
def size_and_processor(request):
    size = request.param
    return size, Sam3ImageProcessor(size={"height": size, "width": size})


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("seed", [0, 1])
def test_resize_then_normalize_matches_processor(size_and_processor, shape, seed):
    size, processor = size_and_processor
    height, width = shape(size)
    rgb = random_image(height, width, seed)
    resized = resize_to_model(rgb, size)
    assert isinstance(resized, np.ndarray)
    assert resized.dtype == np.uint8 and resized.shape == (3, size, size)
    pixels = normalize(torch.from_numpy(resized))
    expected = processor(images=Image.fromarray(rgb), return_tensors="pt").pixel_values[0]
    assert pixels.dtype == torch.float32 == expected.dtype
    assert torch.equal(pixels, expected)


@pytest.mark.parametrize("size", TINY_SIZES)
def test_exact_size_returned_unchanged(size):
    rgb = random_image(size, size, 3)
    resized = resize_to_model(rgb, size)
    assert resized.dtype == np.uint8 and resized.shape == (3, size, size)
    np.testing.assert_array_equal(resized, rgb.transpose(2, 0, 1))
    resized[:] = 0  # the result is a copy: writing to it leaves the input alone
    assert rgb.any()


@pytest.mark.parametrize("size", TINY_SIZES)
def test_non_contiguous_input(size):
    rgb = random_image(2 * size + 3, 3 * size, 4)
    view = rgb[::-1, ::2]
    assert not view.flags.c_contiguous
    np.testing.assert_array_equal(resize_to_model(view, size), resize_to_model(np.ascontiguousarray(view), size))


@pytest.mark.parametrize("size", TINY_SIZES)
def test_constant_image_stays_constant(size):
    rgb = np.full((3 * size, size + 5, 3), (0, 128, 255), dtype=np.uint8)
    resized = resize_to_model(rgb, size)
    assert (resized[0] == 0).all() and (resized[1] == 128).all() and (resized[2] == 255).all()


def test_normalize_endpoints_and_midpoint():
    out = normalize(torch.tensor([0, 255], dtype=torch.uint8))
    assert out.dtype == torch.float32
    assert out.tolist() == [-1.0, 1.0]
    mid = normalize(torch.tensor([127.5], dtype=torch.float32))
    assert mid.dtype == torch.float32 and mid.item() == 0.0
    # Symmetric around the midpoint, exactly.
    low, high = normalize(torch.tensor([127, 128], dtype=torch.uint8)).tolist()
    assert low == -high and 0 < high < 0.01


def test_normalize_all_uint8_values_monotonic_in_range():
    values = normalize(torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16))
    assert values.dtype == torch.float32 and values.shape == (1, 16, 16)
    flat = values.flatten()
    assert (flat[1:] > flat[:-1]).all()
    assert flat.min().item() == -1.0 and flat.max().item() == 1.0
    np.testing.assert_allclose(flat.numpy(), np.arange(256) / 127.5 - 1, rtol=0, atol=1e-6)


def test_normalize_matches_processor_on_every_value():
    # An S x S image holding every uint8 value in every channel: no resize, so only the normalization acts.
    size = 16
    rgb = np.stack([np.arange(256, dtype=np.uint8).reshape(size, size)] * 3, axis=-1)
    processor = Sam3ImageProcessor(size={"height": size, "width": size})
    expected = processor(images=Image.fromarray(rgb), return_tensors="pt").pixel_values[0]
    assert torch.equal(normalize(torch.from_numpy(resize_to_model(rgb, size))), expected)
