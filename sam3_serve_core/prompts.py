"""Prompt preparation: validate and convert text, box and point prompts into model inputs.

Pure functions (torch, no model). They reproduce `Sam3Processor` (text, box exemplars) and
`Sam3TrackerProcessor` (points) exactly, using the same float32 torch operations. The API's prompt rules are
`client.protocol`'s, applied here to in-process callers too; what is added here is what depends on the image,
the checkpoint or the service's limits, and input that would make the model raise or silently misbehave.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from client.errors import InvalidPromptError, PromptTooLongError
from client.protocol import box_set_pairs, check_geometry, check_prompt, check_texts

# The text `Sam3Processor` uses for a boxes-only prompt.
BOXES_ONLY_TEXT = "visual"
# transformers' marker for padded boxes and points.
PAD_VALUE = -10


@dataclass(frozen=True)
class TokenizedText:
    input_ids: np.ndarray  # int64 [L]
    attention_mask: np.ndarray  # int64 [L]


@dataclass(frozen=True)
class ConceptPrompt:
    """A `Sam3Model` prompt: text, optionally with box exemplars (cxcywh in [0, 1]) and their labels."""

    text: TokenizedText
    boxes_cxcywh: np.ndarray | None = None  # float32 [N, 4]
    box_labels: np.ndarray | None = None  # int64 [N]


@dataclass(frozen=True)
class PointPrompt:
    """A `Sam3TrackerModel` prompt: one object, from points in model-resolution pixels."""

    points: np.ndarray  # float32 [N, 2]
    labels: np.ndarray  # int64 [N]


Prompt = ConceptPrompt | PointPrompt


def tokenize(tokenizer: PreTrainedTokenizerBase, text: str, max_tokens: int) -> TokenizedText:
    """Tokenize to exactly `max_tokens`, as `Sam3Processor` does; refuse what it would truncate or break on."""
    check_texts([text])
    encoded = tokenizer(text, padding="max_length", max_length=max_tokens, return_tensors="np")
    length = encoded["input_ids"].shape[-1]
    if length > max_tokens:
        raise PromptTooLongError(
            f"text prompt is {length} tokens with start and end markers; this checkpoint takes at most {max_tokens}"
        )
    return TokenizedText(
        input_ids=encoded["input_ids"][0].astype(np.int64),
        attention_mask=encoded["attention_mask"][0].astype(np.int64),
    )


def _geometry_arrays(name: str, values, labels) -> tuple[np.ndarray, np.ndarray]:
    """Points or boxes that pass the API's rules as float32 [N, width] and int64 [N], refusing what float32
    cannot hold (the model computes in it)."""
    check_geometry(name, values, labels)
    try:
        with np.errstate(over="ignore"):
            array = np.asarray(values, dtype=np.float64).astype(np.float32)
    except OverflowError as error:  # an integer too large for any float
        raise InvalidPromptError(f"{name} must be numbers within float32 range") from error
    if not np.isfinite(array).all():
        raise InvalidPromptError(f"{name} must be finite numbers within float32 range (no NaN or infinity)")
    return array, np.asarray(labels, dtype=np.int64)


def _check_near_image(coordinates: np.ndarray, name: str, height: int, width: int) -> None:
    """Refuse coordinates more than one image size outside the image.

    Such prompts mean nothing, and extreme ones crash the model's box pooling (`roi_align`) or overflow
    float32 to infinity once scaled.
    """
    xs, ys = coordinates[:, 0::2], coordinates[:, 1::2]
    if (xs < -width).any() or (xs > 2 * width).any() or (ys < -height).any() or (ys > 2 * height).any():
        raise InvalidPromptError(
            f"{name} must lie within one image size of the {width}x{height} image "
            f"(x in [{-width}, {2 * width}], y in [{-height}, {2 * height}])"
        )


def box_exemplars(boxes_xyxy, labels, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel xyxy boxes to the normalized cxcywh exemplars `Sam3Model` takes, with their labels.

    Boxes must have positive area. Coordinates outside the image are kept as given (`Sam3Processor`
    does not clip either) up to one image size beyond each edge, and refused further out.
    """
    boxes, box_labels = _geometry_arrays("boxes", boxes_xyxy, labels)
    _check_near_image(boxes, "boxes", height, width)
    if ((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])).any():
        raise InvalidPromptError("each box must be [x0, y0, x1, y1] with x1 > x0 and y1 > y0")
    xyxy = torch.from_numpy(boxes)
    corners = xyxy.reshape(-1, 2, 2)
    corners[..., 0] = corners[..., 0] / width
    corners[..., 1] = corners[..., 1] / height
    x0, y0, x1, y1 = corners.reshape(-1, 4).unbind(-1)
    cxcywh = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)
    return cxcywh.numpy(), box_labels


def scale_points(points_xy, labels, height: int, width: int, model_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel points to model-resolution pixels (`x * size / W`), as `Sam3TrackerProcessor` does.

    The factor is computed as the processor computes it with `return_tensors="pt"` (integer tensors
    divided in float32), which on some widths is one ulp off the correctly rounded `size / W`.
    """
    points, point_labels = _geometry_arrays("points", points_xy, labels)
    _check_near_image(points, "points", height, width)
    scaled = torch.from_numpy(points)
    scaled[..., 0] = scaled[..., 0] * (model_size / torch.tensor(width))
    scaled[..., 1] = scaled[..., 1] * (model_size / torch.tensor(height))
    return scaled.numpy(), point_labels


def pad_box_exemplars(prompts: list[ConceptPrompt]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack box exemplars of several prompts, padded exactly as `Sam3Processor` pads them.

    It pads xyxy with -10 and then converts to cxcywh, so padded boxes read (-10, -10, 0, 0); their
    label -10 is what makes the model ignore them.
    """
    count = max(prompt.boxes_cxcywh.shape[0] for prompt in prompts)
    boxes = torch.tensor([PAD_VALUE, PAD_VALUE, 0, 0], dtype=torch.float32).repeat(len(prompts), count, 1)
    labels = torch.full((len(prompts), count), PAD_VALUE, dtype=torch.int64)
    for row, prompt in enumerate(prompts):
        boxes[row, : prompt.boxes_cxcywh.shape[0]] = torch.from_numpy(prompt.boxes_cxcywh)
        labels[row, : prompt.box_labels.shape[0]] = torch.from_numpy(prompt.box_labels)
    return boxes, labels


def build_prompts(
    *,
    text: str | list[str] | None,
    points,
    boxes,
    labels,
    tokenizer: PreTrainedTokenizerBase,
    text_max_tokens: int,
    model_size: int,
    height: int,
    width: int,
    box_sets=None,
    max_items: int | None = None,
) -> list[Prompt]:
    """Exactly one prompt type to model prompts: one per text or box-exemplar set, or one for the points.

    Points and boxes outside the image are used as given (neither clipped nor refused, as transformers'
    processors use them) up to one image size beyond each edge. `max_items` bounds how many points or
    boxes one prompt may hold, and how many texts or box sets one request may hold.
    """
    check_prompt(text=text, points=points, boxes=boxes, labels=labels, box_sets=box_sets)
    if text is not None:
        texts = [text] if isinstance(text, str) else list(text)
        _check_count(len(texts), "text entries", max_items)
        return [ConceptPrompt(text=tokenize(tokenizer, each, text_max_tokens)) for each in texts]
    if box_sets is not None:
        pairs = box_set_pairs(box_sets)
        _check_count(len(pairs), "box_sets entries", max_items)
        return [
            _box_prompt(set_boxes, set_labels, tokenizer, text_max_tokens, height, width, max_items)
            for set_boxes, set_labels in pairs
        ]
    if boxes is not None:
        return [_box_prompt(boxes, labels, tokenizer, text_max_tokens, height, width, max_items)]
    scaled_points, point_labels = scale_points(points, labels, height, width, model_size)
    _check_count(len(point_labels), "points", max_items)
    return [PointPrompt(scaled_points, point_labels)]


def _box_prompt(boxes, labels, tokenizer, text_max_tokens: int, height: int, width: int, max_items) -> ConceptPrompt:
    boxes_cxcywh, box_labels = box_exemplars(boxes, labels, height, width)
    _check_count(len(box_labels), "boxes", max_items)
    return ConceptPrompt(
        text=tokenize(tokenizer, BOXES_ONLY_TEXT, text_max_tokens), boxes_cxcywh=boxes_cxcywh, box_labels=box_labels
    )


def _check_count(count: int, name: str, max_items: int | None) -> None:
    if max_items is not None and count > max_items:
        raise InvalidPromptError(f"{count} {name} given; at most {max_items} are accepted per request")
