"""Shared fixtures: the tiny random-weight checkpoints (built once per cache directory) and test images.

The tiny checkpoint's masks are meaningless (random weights); tests use it to run the real loading,
pre-processing, model and post-processing code and to compare it with transformers' own pipeline.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

from tools import tiny_checkpoint

# The two model resolutions every parity test runs at (the real model's is 1008).
TINY_SIZES = (56, 112)


def tiny_checkpoint_dir(size: int) -> Path:
    """Build (or reuse) the tiny checkpoint for `size`; the cache key includes the builder's source."""
    return tiny_checkpoint.cached_checkpoint(_test_cache(), image_size=size)


def preset_checkpoint_dir(preset: str) -> Path:
    """Build (or reuse) a preset's random-weight checkpoint at its own resolution (`mid`: 504 px, a 12-layer ViT)."""
    return tiny_checkpoint.cached_checkpoint(_test_cache(), preset=preset)


def _test_cache() -> Path:
    return Path(os.environ.get("SAM3_TEST_CACHE", Path(tempfile.gettempdir()) / "sam3-serve-test-cache"))


@pytest.fixture(scope="session", params=TINY_SIZES, ids=lambda size: f"tiny{size}")
def tiny_dir(request) -> Path:
    return tiny_checkpoint_dir(request.param)


@pytest.fixture(scope="session")
def tiny112_dir() -> Path:
    return tiny_checkpoint_dir(112)


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth random RGB image (uint8 H x W x 3): smoother than noise, so resizing matters."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(max(2, height // 8), max(2, width // 8), 3)).astype(np.float32)
    rows = np.linspace(0, coarse.shape[0] - 1, height).round().astype(int)
    cols = np.linspace(0, coarse.shape[1] - 1, width).round().astype(int)
    noise = rng.integers(-20, 21, size=(height, width, 3))
    return np.clip(coarse[rows][:, cols] + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def ray_address():
    """One local Ray instance for the whole session, with logical CPUs so fractional replicas fit."""
    import ray
    from ray import serve

    from tools.launch import start_local_ray

    yield start_local_ray()
    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="session")
def serve_port() -> int:
    """Serve's HTTP proxy keeps the port it started with for the whole Ray session: one for every test layer."""
    from tools.launch import free_port

    return free_port()
