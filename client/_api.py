"""The client API (client-api.txt), defined once for the HTTP and the handle client.

Arguments become a `SegmentRequest` after cheap checks (the server re-validates everything), and a
`SegmentResponse` becomes numpy masks. A client subclass only says how one attempt travels; retries
(`client.retry`) wrap it here, the same for both clients.
"""

from __future__ import annotations

import time
import math
from abc import ABC, abstractmethod
from typing import Any, NamedTuple, Sequence

import httpx
import numpy as np
from pydantic import ValidationError

from client.errors import InvalidPromptError, InvalidRequestError
from client.images import ImageInput, encode_image
from client.protocol import BoxExemplars, SegmentRequest, SegmentResponse
from client.retry import RetryPolicy, call_with_retries
from client.rle import decode_mask

SUPPORTED_MODEL_ID = "sam3"

Coordinates = Sequence[Sequence[float]] | np.ndarray


class _GeometryPrompt(NamedTuple):
    """How points and boxes are named and shaped in error messages and checks."""

    singular: str
    shape: str
    size: int


_GEOMETRY_PROMPTS = {
    "points": _GeometryPrompt("point", "[x, y]", 2),
    "boxes": _GeometryPrompt("box", "[x0, y0, x1, y1]", 4),
}


Texts = str | Sequence[str]
BoxSets = Sequence[tuple[Coordinates, Sequence[int]] | dict[str, Any] | BoxExemplars]


def segment_request(
    image_input: ImageInput | None,
    *,
    text: Texts | None = None,
    points: Coordinates | None = None,
    boxes: Coordinates | None = None,
    labels: Sequence[int] | np.ndarray | None = None,
    timeout: float | None = None,
    model_id: str | None = None,
    text_prompt: Texts | None = None,
    prompts: Coordinates | None = None,
    box_sets: BoxSets | None = None,
    score_threshold: float | None = None,
    return_detections: bool = True,
    http: httpx.Client | None = None,
) -> SegmentRequest:
    """The request for client-api.txt's arguments; prompts are checked first so a bad call fetches nothing."""
    _check_timeout(timeout)
    _check_model_id(model_id)
    text = _one_of("text", _as_list(text), "text_prompt", _as_list(text_prompt))
    points = _one_of("points", _as_list(points), "prompts", _as_list(prompts))
    boxes, labels = _as_list(boxes), _as_list(labels)
    box_sets = _box_sets(box_sets)
    _check_prompt(text=text, points=points, boxes=boxes, labels=labels, box_sets=box_sets)
    image = encode_image(image_input, timeout=timeout, http=http)
    try:
        return SegmentRequest(
            image=image,
            text=text,
            points=points,
            boxes=boxes,
            labels=labels,
            box_sets=box_sets,
            score_threshold=score_threshold,
            return_detections=return_detections,
            timeout_s=timeout,
        )
    except ValidationError as error:
        raise InvalidPromptError(f"invalid prompt: {_describe(error)}") from error


def union_mask(response: SegmentResponse) -> np.ndarray:
    """What `run()` returns: every instance OR'd into one (H, W) uint8 0/255 mask."""
    return decode_mask(response.union_mask)


def detections(response: SegmentResponse) -> dict[str, Any]:
    """What `run_with_detections()` returns, in client-api.txt's key order, with plain Python numbers.

    `labels` says which prompt each instance answers: an index into the texts (or box sets) sent.
    """
    return {
        "union_mask": decode_mask(response.union_mask),
        "boxes": [[float(value) for value in box] for box in response.boxes],
        "scores": [float(score) for score in response.scores],
        "masks": [decode_mask(mask) for mask in response.masks],
        "labels": list(response.labels),
    }


class SegmentClient(ABC):
    """`run()` and `run_with_detections()` for both clients; subclasses implement `_segment` only."""

    def __init__(self, *, timeout: float | None, retry_policy: RetryPolicy, image_http: httpx.Client | None = None):
        self.timeout = timeout
        self.retry_policy = retry_policy
        self._image_http = image_http
        self._sleep, self._clock = time.sleep, time.monotonic  # tests swap in a fake clock

    def run(
        self,
        image_input: ImageInput | None = None,
        text: Texts | None = None,
        points: Coordinates | None = None,
        boxes: Coordinates | None = None,
        labels: Sequence[int] | np.ndarray | None = None,
        timeout: float | None = None,
        *,
        model_id: str | None = None,
        text_prompt: Texts | None = None,
        prompts: Coordinates | None = None,
        box_sets: BoxSets | None = None,
        score_threshold: float | None = None,
    ) -> np.ndarray:
        """The union mask (H, W) uint8, 255 = foreground; asks the server for no per-instance masks.

        `text` may be a list of concepts and `box_sets` several exemplar sets (one vision pass for all);
        `score_threshold` replaces the service's (0.5) for this call.
        """
        timeout = self._timeout_for(timeout)
        request = segment_request(
            image_input,
            text=text,
            points=points,
            boxes=boxes,
            labels=labels,
            timeout=timeout,
            model_id=model_id,
            text_prompt=text_prompt,
            prompts=prompts,
            box_sets=box_sets,
            score_threshold=score_threshold,
            return_detections=False,
            http=self._image_http,
        )
        return union_mask(self._segment_with_retries(request, timeout))

    def run_with_detections(
        self,
        image_input: ImageInput | None = None,
        text: Texts | None = None,
        points: Coordinates | None = None,
        boxes: Coordinates | None = None,
        labels: Sequence[int] | np.ndarray | None = None,
        timeout: float | None = None,
        *,
        model_id: str | None = None,
        text_prompt: Texts | None = None,
        prompts: Coordinates | None = None,
        box_sets: BoxSets | None = None,
        score_threshold: float | None = None,
    ) -> dict[str, Any]:
        """`union_mask`, `boxes`, `scores` (descending), `masks` and `labels` (the prompt each answers);
        point prompts give empty lists."""
        timeout = self._timeout_for(timeout)
        request = segment_request(
            image_input,
            text=text,
            points=points,
            boxes=boxes,
            labels=labels,
            timeout=timeout,
            model_id=model_id,
            text_prompt=text_prompt,
            prompts=prompts,
            box_sets=box_sets,
            score_threshold=score_threshold,
            return_detections=True,
            http=self._image_http,
        )
        return detections(self._segment_with_retries(request, timeout))

    def _segment_with_retries(self, request: SegmentRequest, timeout: float | None) -> SegmentResponse:
        """Each attempt carries the time left, so the server drops work the caller no longer waits for."""
        return call_with_retries(
            lambda remaining: self._segment(request.model_copy(update={"timeout_s": remaining}), remaining),
            policy=self.retry_policy,
            timeout=timeout,
            sleep=self._sleep,
            clock=self._clock,
        )

    @abstractmethod
    def _segment(self, request: SegmentRequest, timeout: float | None) -> SegmentResponse:
        """Send one attempt and return its response, raising only `client.errors` types."""

    def _timeout_for(self, timeout: float | None) -> float | None:
        """A per-call timeout overrides the client's default."""
        return self.timeout if timeout is None else timeout


def _check_timeout(timeout: float | None) -> None:
    if timeout is not None and not timeout > 0:
        raise InvalidRequestError(f"timeout must be a positive number of seconds or None, got {timeout!r}")


def _check_model_id(model_id: str | None) -> None:
    if model_id not in (None, SUPPORTED_MODEL_ID):
        raise InvalidRequestError(f"unsupported model_id {model_id!r}: this service serves {SUPPORTED_MODEL_ID!r}")


def _one_of(name: str, value: Any, alias: str, alias_value: Any) -> Any:
    """An argument given under its name or its alias, not both (two values would be ambiguous)."""
    if value is not None and alias_value is not None:
        raise InvalidPromptError(f"give {name} or its alias {alias}, not both")
    return value if value is not None else alias_value


def _as_list(value: Any) -> Any:
    """Numpy arrays become nested lists of Python numbers, which the wire model takes."""
    return value.tolist() if isinstance(value, np.ndarray) else value


def _box_sets(box_sets: BoxSets | None) -> list[dict[str, Any]] | None:
    """Each box set as {"boxes", "labels"}: given as the wire model, a dict or a (boxes, labels) pair."""
    if box_sets is None:
        return None
    if not isinstance(box_sets, (list, tuple)) or not box_sets:
        raise InvalidPromptError("box_sets must be a non-empty list of (boxes, labels) pairs")
    normalized = []
    for entry in box_sets:
        if isinstance(entry, BoxExemplars):
            entry = (entry.boxes, entry.labels)
        elif isinstance(entry, dict):
            entry = (entry.get("boxes"), entry.get("labels"))
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            raise InvalidPromptError(f"each box set must be (boxes, labels) or {{'boxes', 'labels'}}, got {entry!r}")
        boxes, labels = _as_list(entry[0]), _as_list(entry[1])
        _check_coordinates("boxes", boxes)
        _check_labels("boxes", len(boxes), labels)
        normalized.append({"boxes": boxes, "labels": labels})
    return normalized


def _check_prompt(*, text: Any, points: Any, boxes: Any, labels: Any, box_sets: Any = None) -> None:
    given = {
        name: value
        for name, value in (("text", text), ("points", points), ("boxes", boxes), ("box_sets", box_sets))
        if value is not None
    }
    if len(given) != 1:
        raise InvalidPromptError(
            f"give exactly one prompt type (text, points, boxes or box_sets), got {', '.join(given) or 'none'}"
        )
    if text is not None:
        _check_text(text, labels)
        return
    if box_sets is not None:
        if labels is not None:
            raise InvalidPromptError("labels go inside each box set, not beside box_sets")
        return
    name, items = next(iter(given.items()))
    _check_coordinates(name, items)
    _check_labels(name, len(items), labels)


def _check_text(text: Any, labels: Any) -> None:
    texts = [text] if isinstance(text, str) else text
    if not isinstance(texts, (list, tuple)) or not texts:
        raise InvalidPromptError(f"text must be a non-empty string or a non-empty list of them, got {text!r}")
    for each in texts:
        if not isinstance(each, str) or not each.strip():
            raise InvalidPromptError(f"text must be a non-empty string, got {each!r}")
    if labels is not None:
        raise InvalidPromptError("labels go with points or boxes, not with a text prompt")


def _check_coordinates(name: str, items: Any) -> None:
    prompt = _GEOMETRY_PROMPTS[name]
    if not isinstance(items, (list, tuple)) or not items:
        raise InvalidPromptError(f"{name} must be a non-empty list of {prompt.shape}")
    if any(not isinstance(item, (list, tuple)) or len(item) != prompt.size for item in items):
        raise InvalidPromptError(f"each {prompt.singular} must be {prompt.shape} ({prompt.size} numbers): {items!r}")
    if any(isinstance(value, float) and not math.isfinite(value) for item in items for value in item):
        raise InvalidPromptError(f"{name} must be finite numbers (no NaN or infinity): {items!r}")


def _check_labels(name: str, count: int, labels: Any) -> None:
    singular = _GEOMETRY_PROMPTS[name].singular
    if labels is None:
        raise InvalidPromptError(f"labels are required with {name}: one per {singular}, 1 = foreground, 0 = background")
    if not isinstance(labels, (list, tuple)) or len(labels) != count:
        raise InvalidPromptError(f"labels must have one entry per {singular}: {count} {name}, labels {labels!r}")
    if any(label not in (0, 1) for label in labels):
        raise InvalidPromptError(f"labels must be 0 (background) or 1 (foreground), got {labels!r}")


def _describe(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(part) for part in item['loc'])}: {item['msg']}" for item in error.errors())
