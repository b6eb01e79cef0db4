"""The whole data path in one process: decode, prepare, run, post-process.

Tests, the benchmarks and batch jobs use it directly; the Serve deployments split the same pure steps
across a CPU preprocessor, the GPU model pool and a CPU postprocessor.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from deployments.core.checkpoint import ModelGeometry, Sam3Models
from deployments.core.images import ImageSource, decode_image
from deployments.core.postprocess import Segmentation, build_segmentation
from deployments.core.preprocess import resize_to_model
from deployments.core.prompts import build_prompt
from deployments.core.runner import PreparedItem, Sam3Runner


def prepare_item(
    image: ImageSource,
    *,
    tokenizer: PreTrainedTokenizerBase,
    geometry: ModelGeometry,
    text: str | None = None,
    points=None,
    boxes=None,
    labels=None,
    max_image_pixels: int | None = None,
    max_prompt_items: int | None = None,
    deadline: float | None = None,
) -> PreparedItem:
    """Decode and validate one request and turn it into model inputs (CPU only, no weights needed)."""
    rgb = decode_image(image, max_pixels=max_image_pixels)
    height, width = rgb.shape[:2]
    prompt = build_prompt(
        text=text,
        points=points,
        boxes=boxes,
        labels=labels,
        tokenizer=tokenizer,
        text_max_tokens=geometry.text_max_tokens,
        model_size=geometry.image_size,
        height=height,
        width=width,
        max_items=max_prompt_items,
    )
    return PreparedItem(
        pixels=resize_to_model(rgb, geometry.image_size),
        original_size=(height, width),
        prompts=[prompt],
        deadline=deadline,
    )


class Sam3Pipeline:
    def __init__(
        self,
        models: Sam3Models,
        *,
        score_threshold: float = 0.5,
        mask_chunk_size: int = 16,
        max_image_pixels: int | None = None,
    ):
        self.models = models
        self.runner = Sam3Runner(models, score_threshold)
        self.mask_chunk_size = mask_chunk_size
        self.max_image_pixels = max_image_pixels

    def prepare(self, image: ImageSource, **prompt) -> PreparedItem:
        return prepare_item(
            image,
            tokenizer=self.models.tokenizer,
            geometry=self.models.geometry,
            max_image_pixels=self.max_image_pixels,
            **prompt,
        )

    def segment_batch(self, items: list[PreparedItem]) -> list[list[Segmentation]]:
        """One model pass over all items; one segmentation per prompt of each item."""
        raw = self.runner.run(items)
        return [
            [build_segmentation(output, item.original_size, self.mask_chunk_size) for output in outputs]
            for item, outputs in zip(items, raw)
        ]

    def segment(self, image: ImageSource, **prompt) -> Segmentation:
        """Segment one image with one prompt: text=..., or points=/boxes= with labels=."""
        return self.segment_batch([self.prepare(image, **prompt)])[0][0]
