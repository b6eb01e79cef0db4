"""The client API (client-api.txt), defined once for the HTTP and the handle client.

Arguments become a `SegmentRequest` after cheap checks (the server re-validates everything), and a
`SegmentResponse` becomes numpy masks. A client subclass only says how one attempt travels; retries
(`client.retry`) and sending a known image as its id (`client.image_ids`) wrap it here, the same for both clients.
"""

from __future__ import annotations

import logging
import numbers
import time
from abc import ABC, abstractmethod
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypedDict, TypeVar

import httpx
import numpy as np
from PIL import Image
from pydantic import ValidationError
from typing_extensions import Unpack

from client.errors import ImageNotCachedError, InvalidPromptError, InvalidRequestError, RequestTimeoutError, Sam3Error
from client.image_ids import ImageIds, image_key
from client.images import ImageInput, encode_image
from client.protocol import BoxExemplars, Polygon, SegmentRequest, SegmentResponse, box_set_pairs
from client.retry import Plan, RetryPolicy, drive, retry_plan
from client.rle import decode_mask

Coordinates = Sequence[Sequence[float]] | np.ndarray
T = TypeVar("T")
R = TypeVar("R")

logger = logging.getLogger("client")


Texts = str | Sequence[str]
BoxSets = Sequence[tuple[Coordinates, Sequence[int]] | dict[str, Any] | BoxExemplars]


class PromptOptions(TypedDict, total=False):
    """The keyword-only options of every call, beside client-api.txt's arguments (one definition for all)."""

    model_id: str | None  # which of the service's checkpoints answers; none: its default
    text_prompt: Texts | None  # client-api.txt's alias of `text`
    prompts: Coordinates | None  # client-api.txt's alias of `points`
    box_sets: BoxSets | None  # several box-exemplar sets, each a concept of its own (instead of `boxes`)
    score_threshold: float | None  # replaces the service's (0.5) for this call
    max_instances: int | None  # keep only this many concept instances, the highest scoring
    polygons: bool  # run_with_detections: also each instance's outline (and the union's) as polygons
    polygon_tolerance: float | None  # how many pixels a simplified polygon may stray (default 1)


def segment_request(
    image_input: ImageInput | None,
    *,
    text: Texts | None = None,
    points: Coordinates | None = None,
    boxes: Coordinates | None = None,
    labels: Sequence[int] | np.ndarray | None = None,
    timeout: float | None = None,
    return_detections: bool = True,
    http: httpx.Client | None = None,
    **options: Unpack[PromptOptions],
) -> SegmentRequest:
    """The request for client-api.txt's arguments; prompts are checked first so a bad call fetches nothing."""
    request = prompt_request(
        text=text,
        points=points,
        boxes=boxes,
        labels=labels,
        timeout=timeout,
        return_detections=return_detections,
        **options,
    )
    return with_image(request, image_input, http=http)


def prompt_request(
    *,
    text: Texts | None = None,
    points: Coordinates | None = None,
    boxes: Coordinates | None = None,
    labels: Sequence[int] | np.ndarray | None = None,
    timeout: float | None = None,
    return_detections: bool = True,
    **options: Unpack[PromptOptions],
) -> SegmentRequest:
    """Every check but the image's, with an empty image: bulk calls check their one prompt once, then `with_image`."""
    unknown = sorted(set(options) - set(PromptOptions.__annotations__))
    if unknown:
        raise TypeError(f"unexpected keyword argument {unknown[0]!r}")
    _check_timeout(timeout)
    text = _one_of("text", _as_list(text), "text_prompt", _as_list(options.get("text_prompt")))
    points = _one_of("points", _as_list(points), "prompts", _as_list(options.get("prompts")))
    boxes, labels = _as_list(boxes), _as_list(labels)
    box_sets = _box_sets(options.get("box_sets"))
    try:  # the wire model checks the prompt (`protocol.check_prompt`)
        return SegmentRequest(
            image=b"",
            text=text,
            points=points,
            boxes=boxes,
            labels=labels,
            box_sets=box_sets,
            score_threshold=options.get("score_threshold"),
            max_instances=options.get("max_instances"),
            return_detections=return_detections,
            polygons=options.get("polygons", False),
            polygon_tolerance=1.0 if options.get("polygon_tolerance") is None else options["polygon_tolerance"],
            timeout_s=timeout,
            model_id=options.get("model_id"),
        )
    except ValidationError as error:
        raise _invalid_argument(error) from error


def with_image(request: SegmentRequest, image_input: ImageInput | None, *, http: httpx.Client | None) -> SegmentRequest:
    """`request` carrying `image_input`, encoded (a file read, a URL fetch): the per-image half of a request."""
    image = encode_image(image_input, timeout=request.timeout_s, http=http)
    return request.model_copy(update={"image": image})


def union_mask(response: SegmentResponse) -> np.ndarray:
    """What `run()` returns: every instance OR'd into one (H, W) uint8 0/255 mask."""
    return decode_mask(response.union_mask)


def detections(response: SegmentResponse) -> dict[str, Any]:
    """What `run_with_detections()` returns, in client-api.txt's key order, with plain Python numbers.

    `labels` says which prompt each instance answers: an index into the texts (or box sets) sent. With
    `polygons=True`, `polygons` gives each instance's regions and `union_polygons` the union's, each region a
    dict of its `exterior` ring and its `holes`, rings as lists of [x, y] pixels.
    """
    answer = {
        "union_mask": decode_mask(response.union_mask),
        "boxes": [[float(value) for value in box] for box in response.boxes],
        "scores": [float(score) for score in response.scores],
        "masks": [decode_mask(mask) for mask in response.masks],
        "labels": list(response.labels),
    }
    if response.polygons is not None:
        answer["polygons"] = [[_plain_polygon(region) for region in regions] for regions in response.polygons]
    if response.union_polygons is not None:
        answer["union_polygons"] = [_plain_polygon(region) for region in response.union_polygons]
    return answer


def _plain_polygon(polygon: Polygon) -> dict[str, list]:
    return {
        "exterior": [list(vertex) for vertex in polygon.exterior],
        "holes": [[list(vertex) for vertex in hole] for hole in polygon.holes],
    }


class ClientCore:
    """What every client holds, blocking or asyncio: the call's budget, the retry policy, the images the
    service knows by id, the hooks, and the plan of one call (`segment_plan`)."""

    def __init__(
        self,
        *,
        timeout: float | None,
        retry_policy: RetryPolicy,
        image_http: httpx.Client | None = None,
        reuse_images: bool = True,
    ):
        self.timeout = timeout
        self.retry_policy = retry_policy
        self._image_http = image_http
        self._image_ids = ImageIds() if reuse_images else None
        self._clock = time.monotonic  # tests swap in a fake clock
        # Called with each error a call retries, from the thread making the call (the Ray job counts retries).
        self.on_retry: Callable[[Exception], None] | None = None
        # Called with each answer as it arrives, before it is decoded: its `timings_ms` (the server's time per
        # stage) and `image_id` are there, which `run()`'s arrays do not carry.
        self.on_response: Callable[[SegmentResponse], None] | None = None

    def _plan(self, request: SegmentRequest, timeout: float | None) -> Plan:
        return segment_plan(
            request,
            timeout,
            image_ids=self._image_ids,
            policy=self.retry_policy,
            clock=self._clock,
            on_retry=self.on_retry,
            on_response=self.on_response,
        )

    def _timeout_for(self, timeout: float | None) -> float | None:
        """A per-call timeout overrides the client's default."""
        return self.timeout if timeout is None else timeout

    def _checked(
        self,
        convert: Callable[[SegmentResponse], Any],
        timeout: float | None,
        text: Texts | None,
        points: Coordinates | None,
        boxes: Coordinates | None,
        labels: Sequence[int] | np.ndarray | None,
        options: PromptOptions,
    ) -> SegmentRequest:
        """What every call does first, before any image is read: the prompt checked and the request built, with
        no image yet (`with_image` adds it); it asks for per-instance masks unless `convert` is `union_mask`."""
        if convert is union_mask and options.get("polygons"):
            raise InvalidRequestError("polygons come back from run_with_detections(), not from run()")
        return prompt_request(
            text=text,
            points=points,
            boxes=boxes,
            labels=labels,
            timeout=timeout,
            return_detections=convert is not union_mask,
            **options,
        )

    def _checked_bulk(self, convert, images, timeout, concurrency, text, points, boxes, labels, options) -> SegmentRequest:
        """`_checked` for a bulk call, which also checks `concurrency` and that `images` is a collection."""
        check_concurrency(concurrency)
        request = self._checked(convert, self._timeout_for(timeout), text, points, boxes, labels, options)
        check_images(images)
        return request


class SegmentClient(ClientCore, ABC):
    """`run()`, `run_with_detections()` and their bulk forms for both blocking clients; subclasses implement
    `_segment` only.

    The bulk forms use threads: the HTTP client's `httpx.Client` is thread-safe and the handle client
    blocks in `.result()`, so a thread per call in flight is all either needs.
    """

    def __init__(self, **core):
        super().__init__(**core)
        self._sleep = time.sleep  # tests swap in a fake clock

    def run(
        self,
        image_input: ImageInput | None = None,
        text: Texts | None = None,
        points: Coordinates | None = None,
        boxes: Coordinates | None = None,
        labels: Sequence[int] | np.ndarray | None = None,
        timeout: float | None = None,
        **options: Unpack[PromptOptions],
    ) -> np.ndarray:
        """The union mask (H, W) uint8, 255 = foreground; asks the server for no per-instance masks.

        `text` may be a list of concepts and `box_sets` several exemplar sets (one vision pass for all);
        `score_threshold` replaces the service's (0.5) for this call; `max_instances` keeps only that many
        concept instances, the highest scoring (after the threshold), and the union covers only those
        (`PromptOptions` lists the keyword-only options).
        """
        return self._answer(union_mask, image_input, text, points, boxes, labels, timeout, options)

    def run_with_detections(
        self,
        image_input: ImageInput | None = None,
        text: Texts | None = None,
        points: Coordinates | None = None,
        boxes: Coordinates | None = None,
        labels: Sequence[int] | np.ndarray | None = None,
        timeout: float | None = None,
        **options: Unpack[PromptOptions],
    ) -> dict[str, Any]:
        """`union_mask`, `boxes`, `scores` (descending), `masks` and `labels` (the prompt each answers);
        point prompts give empty lists."""
        return self._answer(detections, image_input, text, points, boxes, labels, timeout, options)

    def segment_many(
        self, requests: Iterable[SegmentRequest], *, concurrency: int = 8
    ) -> Iterator[SegmentResponse | Sam3Error]:
        """Each ready request sent as `run()` sends one (retries; its `timeout_s`, else the client's), `concurrency`
        at a time, for rows that each have their own prompt (a Ray Data batch).

        Lazy and in input order; a request's `Sam3Error` comes in its place so one bad row does not end the job.
        The input is read at most `concurrency` ahead, so a generator of any length keeps memory flat.
        """
        check_concurrency(concurrency)
        return _ordered_map(self._segment_one, requests, concurrency)

    def run_many(
        self,
        images: Iterable[ImageInput],
        text: Texts | None = None,
        points: Coordinates | None = None,
        boxes: Coordinates | None = None,
        labels: Sequence[int] | np.ndarray | None = None,
        timeout: float | None = None,
        *,
        concurrency: int = 8,
        **options: Unpack[PromptOptions],
    ) -> list[np.ndarray | Sam3Error]:
        """`run()` for every image with one prompt, `concurrency` images in flight; results in input order.

        An image that fails (unreadable, undecodable, a server error after retries) gets its `Sam3Error` in
        its slot, so one bad file costs only itself; a bad prompt or `concurrency` raises before anything is
        read or sent. `timeout` bounds each image, not the whole call. Images are read in the worker threads.

            paths = ["a.jpg", "b.jpg", "c.jpg"]
            for path, mask in zip(paths, client.run_many(paths, text="cat", concurrency=16)):
                if isinstance(mask, Sam3Error):
                    print(f"{path} failed: {mask}")
        """
        return self._answer_many(union_mask, images, text, points, boxes, labels, timeout, concurrency, options)

    def run_many_with_detections(
        self,
        images: Iterable[ImageInput],
        text: Texts | None = None,
        points: Coordinates | None = None,
        boxes: Coordinates | None = None,
        labels: Sequence[int] | np.ndarray | None = None,
        timeout: float | None = None,
        *,
        concurrency: int = 8,
        **options: Unpack[PromptOptions],
    ) -> list[dict[str, Any] | Sam3Error]:
        """`run_with_detections()` for every image, as `run_many()` does `run()`."""
        return self._answer_many(detections, images, text, points, boxes, labels, timeout, concurrency, options)

    def _answer(
        self,
        convert: Callable[[SegmentResponse], R],
        image_input: ImageInput | None,
        text: Texts | None,
        points: Coordinates | None,
        boxes: Coordinates | None,
        labels: Sequence[int] | np.ndarray | None,
        timeout: float | None,
        options: PromptOptions,
    ) -> R:
        """One call: the request, sent with retries, converted."""
        timeout = self._timeout_for(timeout)
        request = self._checked(convert, timeout, text, points, boxes, labels, options)
        request = with_image(request, image_input, http=self._image_http)
        return convert(self._segment_with_retries(request, timeout))

    def _answer_many(
        self,
        convert: Callable[[SegmentResponse], R],
        images: Iterable[ImageInput],
        text: Texts | None,
        points: Coordinates | None,
        boxes: Coordinates | None,
        labels: Sequence[int] | np.ndarray | None,
        timeout: float | None,
        concurrency: int,
        options: PromptOptions,
    ) -> list[R | Sam3Error]:
        """The prompt checked once, then every image encoded, sent and decoded in a worker, so file reads and
        RLE decoding overlap too."""
        request = self._checked_bulk(convert, images, timeout, concurrency, text, points, boxes, labels, options)

        def one(image_input: ImageInput) -> R:
            return convert(self._segment_one(with_image(request, image_input, http=self._image_http)))

        return list(_ordered_map(one, images, concurrency))

    def _segment_one(self, request: SegmentRequest) -> SegmentResponse:
        return self._segment_with_retries(request, self._timeout_for(request.timeout_s))

    def _segment_with_retries(self, request: SegmentRequest, timeout: float | None) -> SegmentResponse:
        return drive(self._plan(request, timeout), self._attempt, self._sleep)

    def _attempt(self, request: SegmentRequest, remaining: float | None) -> SegmentResponse:
        """Each attempt carries the time left, so the server drops work the caller no longer waits for."""
        return self._segment(request.model_copy(update={"timeout_s": remaining}), remaining)

    @abstractmethod
    def _segment(self, request: SegmentRequest, timeout: float | None) -> SegmentResponse:
        """Send one attempt and return its response, raising only `client.errors` types."""


def segment_plan(
    request: SegmentRequest,
    timeout: float | None,
    *,
    image_ids: ImageIds | None,
    policy: RetryPolicy,
    clock: Callable[[], float],
    on_retry: Callable[[Exception], None] | None,
    on_response: Callable[[SegmentResponse], None] | None,
) -> Plan:
    """How every client answers one request (a plan: `client.retry`), whatever carries its attempts.

    An image sent before goes as its `image_id`; if the service has evicted it, the bytes go again, within
    the same `timeout`. A request that already names an `image_id` goes as it is. Each send is retried
    under `policy`."""

    def sent(ready: SegmentRequest, budget: float | None) -> Plan:
        response = yield from retry_plan(ready, policy=policy, timeout=budget, clock=clock, on_retry=on_retry)
        if on_response is not None:
            on_response(response)
        return response

    if image_ids is None or request.image is None:
        return (yield from sent(request, timeout))
    key = image_key(request)
    image_id = image_ids.get(key)
    if image_id is not None:
        by_id = request.model_copy(update={"image": None, "image_id": image_id})
        started = clock()
        try:
            return (yield from sent(by_id, timeout))
        except ImageNotCachedError as error:
            image_ids.forget(key)
            logger.info("image %s is no longer cached by the service: sending its bytes again", image_id)
            if timeout is not None:
                timeout -= clock() - started
                if timeout <= 0:
                    raise RequestTimeoutError(f"no time left to send image {image_id} again: {error}") from error
    response = yield from sent(request, timeout)
    if response.image_id is not None:
        image_ids.put(key, response.image_id)
    return response


def _ordered_map(work: Callable[[T], R], items: Iterable[T], concurrency: int) -> Iterator[R | Sam3Error]:
    """`work(item)` on `concurrency` threads, results in input order, an item's `Sam3Error` in its place.

    A sliding window: the next item is taken only as the oldest result is handed out, so at most
    `concurrency` calls are in flight and no more than `concurrency + 1` items have been read.
    Any other exception is a bug and propagates.
    """
    items = iter(items)
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="sam3-client")
    try:
        window = deque(pool.submit(_outcome, work, item) for item in islice(items, concurrency))
        while window:
            result = window.popleft().result()
            window.extend(pool.submit(_outcome, work, item) for item in islice(items, 1))
            yield result
    finally:
        # Left early (a break, a bug): the few calls in flight finish in the background, unread.
        pool.shutdown(wait=False, cancel_futures=True)


def _outcome(work: Callable[[T], R], item: T) -> R | Sam3Error:
    try:
        return work(item)
    except Sam3Error as error:
        return without_tracebacks(error)


def without_tracebacks(error: Sam3Error) -> Sam3Error:
    """A kept error's traceback would keep its frames alive, and with them the encoded image."""
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        cause.__traceback__ = None
        cause = cause.__cause__ or cause.__context__
    return error


def check_concurrency(concurrency: int) -> None:
    if isinstance(concurrency, bool) or not isinstance(concurrency, numbers.Integral) or concurrency < 1:
        raise InvalidRequestError(f"concurrency must be a positive integer, got {concurrency!r}")


def check_images(images: Any) -> None:
    """One image where a list belongs would otherwise be iterated as characters, bytes or pixel rows."""
    single = isinstance(images, (str, Path, bytes, bytearray, Image.Image))
    if single or (isinstance(images, np.ndarray) and images.ndim < 4):
        raise InvalidRequestError(
            f"images must be an iterable of images (a list, a generator, an (N, H, W, C) array), "
            f"got one {type(images).__name__}"
        )


def _check_timeout(timeout: float | None) -> None:
    if timeout is not None and not timeout > 0:
        raise InvalidRequestError(f"timeout must be a positive number of seconds or None, got {timeout!r}")


def _one_of(name: str, value: Any, alias: str, alias_value: Any) -> Any:
    """An argument given under its name or its alias, not both (two values would be ambiguous)."""
    if value is not None and alias_value is not None:
        raise InvalidPromptError(f"give {name} or its alias {alias}, not both")
    return value if value is not None else alias_value


def _as_list(value: Any) -> Any:
    """Numpy arrays become nested lists of Python numbers, which the wire model takes."""
    return value.tolist() if isinstance(value, np.ndarray) else value


def _box_sets(box_sets: BoxSets | None) -> list[dict[str, Any]] | None:
    """Each box set as {"boxes", "labels"}, the wire's form: given as the wire model, a dict or a (boxes, labels) pair."""
    if box_sets is None:
        return None
    return [{"boxes": _as_list(boxes), "labels": _as_list(labels)} for boxes, labels in box_set_pairs(box_sets)]


def _invalid_argument(error: ValidationError) -> InvalidRequestError:
    """A bad `model_id` is a bad request; anything else the wire model refuses is a bad prompt."""
    if any(item["loc"][:1] == ("model_id",) for item in error.errors()):
        return InvalidRequestError(f"invalid model_id: {_describe(error)}")
    return InvalidPromptError(f"invalid prompt: {_describe(error)}")


def _describe(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(part) for part in item['loc'])}: {item['msg']}" for item in error.errors())
