"""The whole data path in one process: decode, prepare, run, post-process.

Tests, the benchmarks and batch jobs (`pipelines --via actors`) use it directly; the Serve deployments
split the same pure steps across a CPU preprocessor, the GPU model pool and a CPU postprocessor.
"""

from __future__ import annotations

import time

import numpy as np
from transformers import PreTrainedTokenizerBase

from client.protocol import SegmentRequest, SegmentResponse
from sam3_serve_core.checkpoint import ModelGeometry, Sam3Models
from sam3_serve_core.compilation import PROMPT_REGIONS
from sam3_serve_core.failures import in_place, passing
from sam3_serve_core.images import ImageSource, decode_image
from sam3_serve_core.messages import PreparedItem
from sam3_serve_core.postprocess import Segmentation, encode_segmentation, to_response, unpack_segmentation
from sam3_serve_core.preprocess import resize_to_model
from sam3_serve_core.prompts import build_prompts
from sam3_serve_core.runner import Sam3Runner, run_isolating_failures
from sam3_serve_core.vision_cache import image_key, original_size_of


def prepare_item(
    image: ImageSource | None,
    *,
    tokenizer: PreTrainedTokenizerBase,
    geometry: ModelGeometry,
    image_id: str | None = None,
    checkpoint: str | None = None,
    text: str | list[str] | None = None,
    points=None,
    boxes=None,
    labels=None,
    box_sets=None,
    score_threshold: float | None = None,
    max_instances: int | None = None,
    return_detections: bool = True,
    max_image_pixels: int | None = None,
    max_prompt_items: int | None = None,
    deadline: float | None = None,
) -> PreparedItem:
    """Decode and validate one request and turn it into model inputs (CPU only, no weights needed).

    With `checkpoint`, the item carries its image's id (`image_key`), under which a model replica caches the
    image's vision features. An `image_id` instead of an image names an image sent before: nothing to decode.
    """
    rgb = None if image_id is not None else decode_image(image, max_pixels=max_image_pixels)
    height, width = original_size_of(image_id) if rgb is None else rgb.shape[:2]
    prompts = build_prompts(
        text=text,
        points=points,
        boxes=boxes,
        labels=labels,
        box_sets=box_sets,
        tokenizer=tokenizer,
        text_max_tokens=geometry.text_max_tokens,
        model_size=geometry.image_size,
        height=height,
        width=width,
        max_items=max_prompt_items,
    )
    pixels = None if rgb is None else resize_to_model(rgb, geometry.image_size)
    if pixels is not None and checkpoint is not None:
        image_id = image_key(pixels, (height, width), checkpoint)
    return PreparedItem(
        pixels=pixels,
        original_size=(height, width),
        prompts=prompts,
        image_key=image_id,
        deadline=deadline,
        score_threshold=score_threshold,
        max_instances=max_instances,
        return_detections=return_detections,
    )


def warm_up(runner: Sam3Runner) -> list[float]:
    """Forward passes of every head, before the first request pays for them. Returns each pass's seconds.

    Uncompiled, one pass of a text and a point prompt warms both heads. With compiled layers
    (`compilation.compile_layers`) these passes are the compilation, and their order makes it complete: a
    layer's first graph is specialised to the shapes it saw, and each later pass that changes a dimension
    compiles a graph where that dimension is symbolic. The passes change the batch (one prompt row, then
    several) and, where the compiled layers see the prompt, its length (box exemplars add tokens), in both
    orders, so no request's shapes compile another graph.
    """
    models = runner.models
    size = models.geometry.image_size
    blank = np.zeros((size, size, 3), dtype=np.uint8)
    one_box, two_boxes = [[0, 0, size // 2, size // 2]], [[0, 0, size // 2, size // 2], [size // 4, 0, size, size]]

    def item(**prompt) -> PreparedItem:
        return prepare_item(blank, tokenizer=models.tokenizer, geometry=models.geometry, **prompt)

    if not models.compiled:
        batches = [[item(text="warm up"), item(points=[[1, 1]], labels=[1])]]
    else:
        batches = [
            [item(text="warm up")],
            [item(text="warm up"), item(text="warm up"), item(points=[[1, 1]], labels=[1])],
        ]
    if PROMPT_REGIONS & set(models.compiled_regions):
        batches += [
            [item(boxes=one_box, labels=[1])],
            [item(boxes=one_box, labels=[1]), item(boxes=two_boxes, labels=[1, 0])],
        ]
    seconds = []
    for batch in batches:
        started = time.perf_counter()
        runner.run(batch)
        seconds.append(time.perf_counter() - started)
    return seconds


def prepare_request(
    request: SegmentRequest,
    *,
    tokenizer: PreTrainedTokenizerBase,
    geometry: ModelGeometry,
    checkpoint: str | None = None,
    max_image_pixels: int | None = None,
    max_prompt_items: int | None = None,
    deadline: float | None = None,
) -> PreparedItem:
    """`prepare_item` for a wire request: what the preprocessor does with each request it is sent."""
    return prepare_item(
        request.image,
        tokenizer=tokenizer,
        geometry=geometry,
        image_id=request.image_id,
        checkpoint=checkpoint,
        text=request.text,
        points=request.points,
        boxes=request.boxes,
        labels=request.labels,
        box_sets=request.box_sets,
        score_threshold=request.score_threshold,
        max_instances=request.max_instances,
        return_detections=request.return_detections,
        max_image_pixels=max_image_pixels,
        max_prompt_items=max_prompt_items,
        deadline=deadline,
    )


class Sam3Pipeline:
    def __init__(
        self,
        models: Sam3Models,
        *,
        score_threshold: float = 0.5,
        mask_chunk_pixels: int = 16_000_000,
        max_image_pixels: int | None = None,
        max_prompt_items: int | None = None,
    ):
        self.models = models
        self.runner = Sam3Runner(models, score_threshold, mask_chunk_pixels=mask_chunk_pixels)
        self.mask_chunk_pixels = mask_chunk_pixels
        self.max_image_pixels = max_image_pixels
        self.max_prompt_items = max_prompt_items

    def prepare(self, image: ImageSource, **prompt) -> PreparedItem:
        return prepare_item(
            image,
            tokenizer=self.models.tokenizer,
            geometry=self.models.geometry,
            max_image_pixels=self.max_image_pixels,
            max_prompt_items=self.max_prompt_items,
            **prompt,
        )

    def segment_batch(self, items: list[PreparedItem]) -> list[Segmentation]:
        """One model pass over all items; one segmentation (all of its prompts together) per item."""
        return [unpack_segmentation(packed) for packed in self.runner.run(items)]

    def segment(self, image: ImageSource, **prompt) -> Segmentation:
        """Segment one image: text=... (one or a list), or points=/boxes= with labels=, or box_sets=[...]."""
        return self.segment_batch([self.prepare(image, **prompt)])[0]

    def answer(self, requests: list[SegmentRequest]) -> list[SegmentResponse | Exception]:
        """The service's answer to each request, in one process and one model pass: the same steps as the
        preprocessor, the model pool and the postprocessor, with an error in place of each failed request."""
        prepared: list[PreparedItem | Exception] = []
        for request in requests:
            try:
                prepared.append(self.prepare_request(request))
            except Exception as error:  # one answer per request: a bad one fails alone
                prepared.append(error)
        items = passing(prepared)
        results = in_place(prepared, run_isolating_failures(self.runner, items, self.models.device) if items else [])
        return [
            result
            if isinstance(result, Exception)
            else to_response(
                encode_segmentation(result, self.mask_chunk_pixels, request.outline_tolerance), request.prompt_type, {}
            )
            for request, result in zip(requests, results)
        ]

    def prepare_request(self, request: SegmentRequest) -> PreparedItem:
        return prepare_request(
            request,
            tokenizer=self.models.tokenizer,
            geometry=self.models.geometry,
            max_image_pixels=self.max_image_pixels,
            max_prompt_items=self.max_prompt_items,
        )
