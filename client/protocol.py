"""The one wire format: request and response models shared by the server and both clients, and the prompt rules.

Pydantic only (no torch, no Ray). Over HTTP the models travel as JSON, with the image bytes in base64;
through a Ray Serve handle the same objects travel as they are. Unknown fields are refused, and a
`SegmentRequest` holds only a well-formed prompt (`check_prompt`, which the model core applies to in-process
callers too): a bad one raises `InvalidPromptError` wherever the request is made.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, model_validator

from client.errors import InvalidPromptError

API_VERSION = "v1"
SEGMENT_PATH = f"/{API_VERSION}/segment"
HEALTH_PATH = f"/{API_VERSION}/health"
# 200 once every stage has a running replica, else 503 with the reason: what load balancers and probes ask.
READY_PATH = f"/{API_VERSION}/ready"
# Every answer carries it (the caller's own id if it sent one), and the server logs failures under it.
REQUEST_ID_HEADER = "x-request-id"
INFO_PATH = f"/{API_VERSION}/info"

PromptType = Literal["text", "points", "boxes"]

# What the service calls an image it has seen: a content hash of its model-ready pixels and the checkpoint,
# then the original height and width (which prompts in pixels are scaled against).
IMAGE_ID_PATTERN = r"^[0-9a-f]{32}-[1-9][0-9]{0,5}x[1-9][0-9]{0,5}$"


class WireModel(BaseModel):
    """Base of every wire model: unknown fields are an error, bytes are base64 in JSON."""

    model_config = ConfigDict(extra="forbid", ser_json_bytes="base64", val_json_bytes="base64", frozen=True)


class BoxExemplars(WireModel):
    """One set of box exemplars: together they describe one concept."""

    boxes: list[list[float]] = Field(description="[[x0, y0, x1, y1], ...] in pixels.")
    labels: list[int] = Field(description="One per box: 1 positive exemplar, 0 negative.")


class SegmentRequest(WireModel):
    """One image and exactly one prompt type: text, points with labels, or boxes with labels (or box sets).

    Several concepts (a list of texts, or several box-exemplar sets) share one vision pass; each instance
    of the answer says which of them it answers (`labels`, an index into the list).
    """

    image: bytes | None = Field(
        None,
        description="The encoded image file (JPEG, PNG, WebP, ...) or a .npy array of uint8 pixels, base64 in JSON. "
        "Send it, or `image_id` instead.",
    )
    image_id: str | None = Field(
        None,
        pattern=IMAGE_ID_PATTERN,
        description="Instead of `image`: the `image_id` of an earlier answer, to reuse that image's vision features. "
        "If no replica holds them any more, the answer is 404 `image_not_cached`: send the image again.",
    )
    text: str | list[str] | None = Field(
        None, description="A concept, or several, to segment: every instance of each is returned."
    )
    points: list[list[float]] | None = Field(None, description="[[x, y], ...] in pixels: one object.")
    boxes: list[list[float]] | None = Field(
        None, description="[[x0, y0, x1, y1], ...] in pixels: exemplars of a concept."
    )
    labels: list[int] | None = Field(None, description="One per point or box: 1 foreground, 0 background.")
    box_sets: list[BoxExemplars] | None = Field(
        None, description="Several box-exemplar sets, each a concept of its own (instead of `boxes`)."
    )
    score_threshold: float | None = Field(
        None, gt=0, lt=1, description="Keep concept instances scoring above it (default: the service's, 0.5)."
    )
    max_instances: int | None = Field(
        None,
        ge=1,
        description="Return at most this many concept instances, the highest scoring (after `score_threshold`); "
        "the union mask covers the ones returned. None: every instance above the threshold.",
    )
    return_detections: bool = Field(
        True, description="False returns only the union mask (what `run()` needs), not the instances."
    )
    polygons: bool = Field(
        False,
        description="Also return the masks' outlines as polygons (each region's outer ring and its holes, in "
        "pixels), for annotation tools: per instance in `polygons`, and the union's in `union_polygons`.",
    )
    polygon_tolerance: float = Field(
        1.0,
        ge=0,
        le=100,
        description="With `polygons`: how many pixels a simplified polygon may stray from the mask's traced "
        "outline (Douglas-Peucker); 0 keeps every corner of the outline.",
    )
    timeout_s: float | None = Field(
        None, gt=0, description="The caller's time budget: work still queued when it runs out is dropped."
    )
    model_id: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        description="Which of the service's checkpoints answers (its `models` setting); none: the default one.",
    )

    @model_validator(mode="after")
    def _one_image_and_one_prompt(self) -> SegmentRequest:
        if (self.image is None) == (self.image_id is None):
            raise ValueError("send exactly one of `image` and `image_id`")
        check_prompt(text=self.text, points=self.points, boxes=self.boxes, labels=self.labels, box_sets=self.box_sets)
        return self

    @property
    def outline_tolerance(self) -> float | None:
        """The tolerance to outline the answer's masks at, or None when no polygons are asked."""
        return self.polygon_tolerance if self.polygons else None

    @property
    def prompt_type(self) -> PromptType:
        if self.text is not None:
            return "text"
        return "points" if self.points is not None else "boxes"


class RleMask(WireModel):
    """A binary mask as COCO compressed RLE (pycocotools), column-major, of the image's full size."""

    size: tuple[int, int] = Field(description="[height, width]")
    counts: str


class Polygon(WireModel):
    """One region of a mask: its outer ring and the rings of its holes, each a closed list of [x, y] vertices
    (the indices of the region's boundary pixels, as OpenCV traces them; `cv2.fillPoly` draws them back)."""

    exterior: list[tuple[int, int]]
    holes: list[list[tuple[int, int]]] = Field(default_factory=list)


class SegmentResponse(WireModel):
    """Instances sorted by descending score. Point prompts give the union mask and no instances."""

    api_version: Literal["v1"] = API_VERSION
    prompt_type: PromptType
    height: int
    width: int
    union_mask: RleMask
    masks: list[RleMask] = Field(default_factory=list)
    boxes: list[tuple[float, float, float, float]] = Field(default_factory=list, description="Pixel xyxy.")
    scores: list[float] = Field(default_factory=list)
    labels: list[int] = Field(
        default_factory=list, description="Which prompt each instance answers: an index into the texts or box sets."
    )
    timings_ms: dict[str, float] = Field(
        default_factory=dict,
        description="Server time per stage (preprocess, queue, model, postprocess, total). `vision` is the part of "
        "`model` spent in the ViT pass that encoded the image, 0 when its features came from the cache.",
    )
    image_id: str | None = Field(
        None, description="Send it as `image_id` instead of the image to ask more of the same image."
    )
    polygons: list[list[Polygon]] | None = Field(
        None, description="With `polygons` asked: each instance's regions, in the order of `masks`."
    )
    union_polygons: list[Polygon] | None = Field(
        None, description="With `polygons` asked: the union mask's regions (a point prompt's object)."
    )


class ErrorDetail(WireModel):
    code: str = Field(description="Stable, machine-readable: the clients map it to a typed exception.")
    message: str
    request_id: str | None = Field(None, description="The request's `X-Request-Id`, which the server's logs name.")


class ErrorResponse(WireModel):
    error: ErrorDetail


class HealthResponse(WireModel):
    """The ingress is up (`status`), and whether the whole application is (`ready`, and why not)."""

    status: Literal["ok"] = "ok"
    api_version: Literal["v1"] = API_VERSION
    ready: bool = Field(True, description="Every stage has a running replica, so requests can be answered.")
    reason: str | None = Field(
        None, description="Why not ready: the stages still starting, or the error that stops one from starting."
    )


class ModelInfo(WireModel):
    """One model the service serves, for `GET /v1/info`."""

    model_id: str = Field(description="What a request names as `model_id`.")
    checkpoint: str = Field(description="The checkpoint's hub name, or its directory's name.")
    default: bool = Field(description="Requests that name no model get this one.")
    random_weights: bool = Field(
        description="True for the project's tiny test checkpoint: random weights, so its masks mean nothing."
    )
    image_size: int | None = Field(
        description="The model's input resolution (pixels per side), read from the checkpoint's config; null "
        "while the preprocessor, which reads it, is not running."
    )
    loaded_replicas: int = Field(
        description="Model replicas that hold it now (or are loading it). 0: the next request for it loads it "
        "first (seconds to minutes with real weights)."
    )


class InfoResponse(WireModel):
    """What a caller needs before its first request (the playground page reads it); never touches the model."""

    api_version: Literal["v1"] = API_VERSION
    checkpoint: str = Field(description="The default model's checkpoint: its hub name, or its directory's name.")
    random_weights: bool = Field(
        description="True when the default model is the project's tiny test checkpoint: random weights, so its "
        "masks mean nothing."
    )
    models: list[ModelInfo] = Field(description="Every model the service serves, the default first.")
    api_key_required: bool = Field(description="Whether /v1/segment needs `Authorization: Bearer <key>`.")
    score_threshold: float = Field(description="Concept instances are kept above it unless a request sets its own.")
    max_image_pixels: int = Field(description="Larger images are refused (413 image_too_large).")
    max_prompt_items: int = Field(description="Most points or boxes in one prompt, and most texts or box sets.")
    max_body_bytes: int = Field(description="Larger request bodies are refused (413 request_too_large).")


# --- the prompt rules ---------------------------------------------------------------------------------


class _Geometry(NamedTuple):
    """How points and boxes are named and shaped in the rules' messages."""

    singular: str
    shape: str
    size: int


_GEOMETRY = {"points": _Geometry("point", "[x, y]", 2), "boxes": _Geometry("box", "[x0, y0, x1, y1]", 4)}


def check_prompt(*, text: Any, points: Any, boxes: Any, labels: Any, box_sets: Any = None) -> None:
    """The API's rules for one request's prompt, for every caller: exactly one prompt type; texts non-empty;
    points and boxes non-empty lists of finite numbers, each with a label, 0 or 1. Raises `InvalidPromptError`.

    The limits that depend on the image or the service (coordinates near the image, counts, token length)
    are the model core's (`sam3_serve_core.prompts`).
    """
    given = {
        name: value
        for name, value in (("text", text), ("points", points), ("boxes", boxes), ("box_sets", box_sets))
        if value is not None
    }
    if len(given) != 1:
        raise InvalidPromptError(
            f"give exactly one prompt type (text, points, boxes or box_sets), got {', '.join(given) or 'none'}"
        )
    name, value = next(iter(given.items()))
    if name in ("text", "box_sets") and labels is not None:
        carried = " (each box set carries its own)" if name == "box_sets" else ""
        raise InvalidPromptError(f"labels go with points or boxes, not with {name}{carried}")
    if name == "text":
        check_texts(value)
    elif name == "box_sets":
        for set_boxes, set_labels in box_set_pairs(value):
            check_geometry("boxes", set_boxes, set_labels)
    else:
        check_geometry(name, value, labels)


def check_texts(text: Any) -> None:
    """A concept: a non-empty string, or a non-empty list of them."""
    texts = [text] if isinstance(text, str) else text
    if not isinstance(texts, (list, tuple)) or not texts:
        raise InvalidPromptError(f"text must be a non-empty string or a non-empty list of them, got {text!r}")
    for each in texts:
        if not isinstance(each, str) or not each.strip():
            raise InvalidPromptError(f"text must be a non-empty string, got {each!r}")


def check_geometry(name: str, items: Any, labels: Any) -> None:
    """`points` or `boxes`: a non-empty list of [x, y] or [x0, y0, x1, y1] finite numbers, with one label each
    (1 foreground or positive, 0 background or negative). Arrays are read as their nested lists."""
    geometry = _GEOMETRY[name]
    items, labels = _plain(items), _plain(labels)
    if not isinstance(items, (list, tuple)) or not items:
        raise InvalidPromptError(f"{name} must be a non-empty list of {geometry.shape}")
    for item in items:
        if not isinstance(item, (list, tuple)) or len(item) != geometry.size:
            raise InvalidPromptError(f"each {geometry.singular} must be {geometry.shape} ({geometry.size} numbers): {items!r}")
        if not all(_is_finite_number(value) for value in item):
            raise InvalidPromptError(f"{name} must be finite numbers (no NaN or infinity): {items!r}")
    if labels is None:
        raise InvalidPromptError(
            f"labels are required with {name}: one per {geometry.singular}, 1 = foreground, 0 = background"
        )
    if not isinstance(labels, (list, tuple)) or len(labels) != len(items):
        raise InvalidPromptError(
            f"labels must have one entry per {geometry.singular}: {len(items)} {name}, labels {labels!r}"
        )
    if any(not isinstance(label, numbers.Integral) or label not in (0, 1) for label in labels):
        raise InvalidPromptError(f"labels must be 0 (background) or 1 (foreground), got {labels!r}")


def box_set_pairs(box_sets: Any) -> list[tuple[Any, Any]]:
    """Each box set as a (boxes, labels) pair, from the wire's `BoxExemplars`, a dict or a pair."""
    if not isinstance(box_sets, (list, tuple)) or not box_sets:
        raise InvalidPromptError("box_sets must be a non-empty list of (boxes, labels) pairs")
    pairs = []
    for entry in box_sets:
        if isinstance(entry, BoxExemplars):
            entry = (entry.boxes, entry.labels)
        elif isinstance(entry, dict):
            entry = (entry.get("boxes"), entry.get("labels"))
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            raise InvalidPromptError(f"each box set must be (boxes, labels) or {{'boxes', 'labels'}}, got {entry!r}")
        pairs.append((entry[0], entry[1]))
    return pairs


def _plain(value: Any) -> Any:
    """A numpy array (or anything with `tolist`) as nested Python lists; anything else as it is."""
    return value.tolist() if hasattr(value, "tolist") and not isinstance(value, (list, tuple, str)) else value


def _is_finite_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    return isinstance(value, numbers.Integral) or math.isfinite(value)
