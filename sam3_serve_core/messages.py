"""What travels between the stages: the preprocessor's prepared item to the model pool, and the model pool's
result to the postprocessor. Plain dataclasses of arrays, pickled by Ray between replicas."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sam3_serve_core.postprocess import PackedSegmentation
from sam3_serve_core.prompts import Prompt


@dataclass
class PreparedItem:
    """One image, resized to the model, with the prompts to answer on it."""

    pixels: np.ndarray | None  # uint8 [3, S, S]; None when the request named a cached image by its id
    original_size: tuple[int, int]  # (H, W) after EXIF orientation
    prompts: list[Prompt]
    image_key: str | None = None  # the image's id (`vision_cache.image_key`): where its features are cached
    deadline: float | None = None  # time.time() after which nobody waits for the answer
    score_threshold: float | None = None  # None: the runner's default
    max_instances: int | None = None  # the most concept instances to answer with, best first; None: all kept
    return_detections: bool = True  # False: the answer needs only the union mask
    timings_ms: dict[str, float] = field(default_factory=dict)  # time per stage so far, for the response


@dataclass
class ModelResult:
    """One request's answer with its masks bit-packed, and what the postprocessor needs to encode it."""

    segmentation: PackedSegmentation
    timings_ms: dict[str, float]
    image_key: str | None  # the image's id, which the answer gives the caller for follow-up prompts
