"""The asyncio HTTP client: the client-api.txt API as coroutines, for callers in an event loop (FastAPI,
aiohttp, Starlette apps), over one `httpx.AsyncClient`.

It shares everything but the waiting with `Sam3HttpClient`: the request's checks and building
(`prompt_request`, `with_image`), the plan of a call with its retries and image ids (`segment_plan`), how an
HTTP call is made and read (`HttpApi`, `checked`), and the answer's decoding (`union_mask`, `detections`).
Files, URLs and arrays are encoded, and masks decoded, in worker threads, so the event loop never waits on
them.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from itertools import islice
from pathlib import Path
from typing import Any, Sequence, TypeVar

import httpx
import numpy as np
from typing_extensions import Unpack

from client._api import (
    ClientCore,
    Coordinates,
    PromptOptions,
    Texts,
    detections,
    union_mask,
    with_image,
    without_tracebacks,
)
from client.errors import Sam3Error
from client._video import TrackOptions, VideoInput, frame_result, line_frame, track_request, video_bytes, video_prompt
from client.http_client import (
    OCTET_STREAM,
    HttpApi,
    VideoCall,
    checked,
    open_video_call,
    parsed,
    prompt_video_call,
    push_frame_call,
    segment_response,
    transport_failure,
)
from client.images import ImageInput, encode_image
from client.protocol import HEALTH_PATH, READY_PATH, SEGMENT_PATH, SegmentRequest, SegmentResponse
from client.retry import RetryPolicy, drive_async
from client.video_protocol import TrackLine, VideoSessionInfo, video_session_path

T = TypeVar("T")
R = TypeVar("R")


class AsyncSam3HttpClient(ClientCore):
    """Segment images through the service's HTTP API from an event loop; use it with `async with` (one
    connection pool), and share it between tasks."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        timeout: float | None = 60.0,
        api_key: str | None = None,
        route_prefix: str = "",
        retries: int = 3,
        backoff_s: float = 0.25,
        max_backoff_s: float = 4.0,
        reuse_images: bool = True,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        """The options of `Sam3HttpClient`, with the same meaning; `transport` is for tests. Image URLs are
        fetched in a worker thread with a blocking client of their own, as `Sam3HttpClient` fetches them
        (never with the API key), through `transport` too where it also serves blocking calls (a mock)."""
        self._http = httpx.AsyncClient(transport=transport)
        image_transport = transport if isinstance(transport, httpx.BaseTransport) else None
        super().__init__(
            timeout=timeout,
            retry_policy=RetryPolicy(retries=retries, backoff_s=backoff_s, max_backoff_s=max_backoff_s),
            image_http=httpx.Client(transport=image_transport),
            reuse_images=reuse_images,
        )
        self._api = HttpApi(base_url, route_prefix, api_key)
        self.base_url = self._api.base_url
        self._sleep: Callable[[float], Awaitable[None]] = asyncio.sleep  # tests swap in a fake clock

    async def run(
        self,
        image_input: ImageInput | None = None,
        text: Texts | None = None,
        points: Coordinates | None = None,
        boxes: Coordinates | None = None,
        labels: Sequence[int] | np.ndarray | None = None,
        timeout: float | None = None,
        **options: Unpack[PromptOptions],
    ) -> np.ndarray:
        """`Sam3HttpClient.run`, awaited: the union mask (H, W) uint8, 255 = foreground."""
        return await self._call(union_mask, image_input, text, points, boxes, labels, timeout, options)

    async def run_with_detections(
        self,
        image_input: ImageInput | None = None,
        text: Texts | None = None,
        points: Coordinates | None = None,
        boxes: Coordinates | None = None,
        labels: Sequence[int] | np.ndarray | None = None,
        timeout: float | None = None,
        **options: Unpack[PromptOptions],
    ) -> dict[str, Any]:
        """`Sam3HttpClient.run_with_detections`, awaited: `union_mask`, `boxes`, `scores`, `masks`, `labels`."""
        return await self._call(detections, image_input, text, points, boxes, labels, timeout, options)

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
    ) -> AsyncIterator[np.ndarray | Sam3Error]:
        """`run()` for every image with one prompt, `concurrency` images in flight, as an async iterator in input
        order; an image that fails gets its `Sam3Error` in its place. A bad prompt or `concurrency` raises
        here, before anything is read or sent. `timeout` bounds each image.

            async for mask in client.run_many(paths, text="cat", concurrency=16):
                if isinstance(mask, Sam3Error): ...
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
    ) -> AsyncIterator[dict[str, Any] | Sam3Error]:
        """`run_with_detections()` for every image, as `run_many()` does `run()`."""
        return self._answer_many(detections, images, text, points, boxes, labels, timeout, concurrency, options)

    async def health(self) -> bool:
        """True when the service answers its health check (the ingress is up); never raises nor retries."""
        return await self._answers(HEALTH_PATH)

    async def ready(self) -> bool:
        """True when every stage has a running replica; never raises nor retries, so it suits polling."""
        return await self._answers(READY_PATH)

    async def aclose(self) -> None:
        await self._http.aclose()
        self._image_http.close()

    async def __aenter__(self) -> AsyncSam3HttpClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

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
    ) -> AsyncIterator[R | Sam3Error]:
        """The prompt checked once, now; each image then encoded, sent and decoded in its own task."""
        request = self._checked_bulk(convert, images, timeout, concurrency, text, points, boxes, labels, options)
        timeout = self._timeout_for(timeout)

        async def outcome(image_input: ImageInput) -> R | Sam3Error:
            try:
                return await self._answer(convert, request, image_input, timeout)
            except Sam3Error as error:
                return without_tracebacks(error)

        return _ordered_map(outcome, images, concurrency)

    async def _call(
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
        timeout = self._timeout_for(timeout)
        request = self._checked(convert, timeout, text, points, boxes, labels, options)
        return await self._answer(convert, request, image_input, timeout)

    async def _answer(
        self, convert: Callable[[SegmentResponse], R], request: SegmentRequest, image_input: ImageInput, timeout: float | None
    ) -> R:
        """One call: the image encoded into the checked request, the plan carried out, the answer decoded."""
        ready = await asyncio.to_thread(with_image, request, image_input, http=self._image_http)
        response = await drive_async(self._plan(ready, timeout), self._attempt, self._sleep)
        return await asyncio.to_thread(convert, response)

    async def _attempt(self, request: SegmentRequest, remaining: float | None) -> SegmentResponse:
        """Each attempt carries the time left, so the server drops work the caller no longer waits for."""
        request = request.model_copy(update={"timeout_s": remaining})
        return segment_response(await self._send("POST", SEGMENT_PATH, timeout=remaining, json_body=request.model_dump_json()))

    # --- video sessions: `Sam3HttpClient`'s calls as coroutines (`client._video` documents them) -------------

    async def track(
        self,
        video: VideoInput,
        text: str | Sequence[str] | None = None,
        points: Any = None,
        labels: Any = None,
        boxes: Any = None,
        frame: int = 0,
        object_ids: Sequence[int] | None = None,
        *,
        model_id: str | None = None,
        timeout: float | None = None,
        **options: Unpack[TrackOptions],
    ) -> AsyncIterator[dict[str, Any]]:
        """`Sam3HttpClient.track`: each frame's objects as the service computes them."""
        prompt = video_prompt(text, points, labels, boxes, frame, object_ids)
        track_request(options)  # a misspelt option fails before the upload
        session = await self.open_video(video, model_id=model_id, timeout=timeout)
        try:
            await self._video_call(prompt_video_call(session.session_id, prompt), timeout)
            async for tracked in self.track_session(session.session_id, timeout=timeout, **options):
                yield tracked
        finally:
            await self.close_video(session.session_id, timeout=timeout)

    async def open_video(self, video: VideoInput | None = None, *, model_id: str | None = None, timeout: float | None = None) -> VideoSessionInfo:
        if video is None or isinstance(video, (str, Path, bytes, bytearray)):
            data = None if video is None else await asyncio.to_thread(video_bytes, video)
            return await self._video_call(open_video_call(data, model_id), timeout)
        session = await self._video_call(open_video_call(None, model_id), timeout)
        try:
            for rgb in video:
                image = await asyncio.to_thread(encode_image, rgb, timeout=timeout)
                await self._video_call(push_frame_call(session.session_id, image), timeout)
        except BaseException:
            await self.close_video(session.session_id, timeout=timeout)
            raise
        return await self.video_session(session.session_id, timeout=timeout)

    async def prompt_video(
        self,
        session_id: str,
        text: str | Sequence[str] | None = None,
        points: Any = None,
        labels: Any = None,
        boxes: Any = None,
        frame: int = 0,
        object_ids: Sequence[int] | None = None,
        *,
        timeout: float | None = None,
    ) -> dict[str, Any] | None:
        request = video_prompt(text, points, labels, boxes, frame, object_ids)
        answer = await self._video_call(prompt_video_call(session_id, request), timeout)
        return None if answer.frame is None else await asyncio.to_thread(frame_result, answer.frame)

    async def track_session(
        self,
        session_id: str,
        *,
        timeout: float | None = None,
        **options: Unpack[TrackOptions],
    ) -> AsyncIterator[dict[str, Any]]:
        request, rle_masks = track_request(options)
        timeout = self._timeout_for(timeout)
        json_body = request.model_dump_json()
        url, headers, request_id = self._api.prepare(video_session_path(session_id, "track"), json_body)
        try:
            async with self._http.stream("POST", url, content=json_body, headers=headers, timeout=timeout) as response:
                if not response.is_success:
                    await response.aread()
                    checked(response, request_id)
                async for text in response.aiter_lines():
                    if text and (frame := await asyncio.to_thread(line_frame, TrackLine.model_validate_json(text), rle_masks)):
                        yield frame
        except httpx.HTTPError as error:
            raise transport_failure("POST", url, timeout, error, request_id) from error

    async def push_frame(self, session_id: str, frame: Any, *, timeout: float | None = None) -> dict[str, Any]:
        image = await asyncio.to_thread(encode_image, frame, timeout=timeout)
        tracked = await self._video_call(push_frame_call(session_id, image), timeout)
        return await asyncio.to_thread(frame_result, tracked)

    async def video_session(self, session_id: str, *, timeout: float | None = None) -> VideoSessionInfo:
        return await self._video_call(VideoCall("GET", video_session_path(session_id), answer=VideoSessionInfo), timeout)

    async def close_video(self, session_id: str, *, timeout: float | None = None) -> None:
        await self._video_call(VideoCall("DELETE", video_session_path(session_id)), timeout)

    async def _video_call(self, call: VideoCall, timeout: float | None):
        response = await self._send(
            call.method, call.path, timeout=self._timeout_for(timeout), json_body=call.json_body, content=call.content
        )
        return None if call.answer is None else parsed(call.answer, response)

    async def _answers(self, path: str) -> bool:
        try:
            await self._send("GET", path, timeout=self.timeout)
        except Sam3Error:
            return False
        return True

    async def _send(
        self, method: str, path: str, *, timeout: float | None, json_body: str | None = None, content: bytes | None = None
    ) -> httpx.Response:
        """The network layer: one request, every failure as a `client.errors` type. `content` is sent as bytes."""
        url, headers, request_id = self._api.prepare(path, json_body, None if content is None else OCTET_STREAM)
        try:
            response = await self._http.request(method, url, content=json_body or content, headers=headers, timeout=timeout)
        except httpx.HTTPError as error:
            raise transport_failure(method, url, timeout, error, request_id) from error
        return checked(response, request_id)


async def _ordered_map(
    work: Callable[[T], Awaitable[R]], items: Iterable[T], concurrency: int
) -> AsyncIterator[R]:
    """`work(item)` as tasks, `concurrency` at a time, results in input order.

    A sliding window: the next item is taken only as the oldest result is handed out, so a generator of
    any length keeps memory flat. Left early (a break), the tasks still in flight are cancelled.
    """
    items = iter(items)
    window = deque(asyncio.ensure_future(work(item)) for item in islice(items, concurrency))
    try:
        while window:
            result = await window.popleft()
            window.extend(asyncio.ensure_future(work(item)) for item in islice(items, 1))
            yield result
    finally:
        for task in window:
            task.cancel()
