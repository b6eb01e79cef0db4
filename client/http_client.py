"""The HTTP client: the client-api.txt API over the service's JSON endpoint, for callers outside Ray."""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlencode

import httpx
from pydantic import BaseModel, ValidationError

from client._api import SegmentClient
from client._video import VideoClient
from client.errors import (
    AuthenticationError,
    ConnectionFailedError,
    InvalidRequestError,
    NotFoundError,
    RequestTimeoutError,
    Sam3Error,
    ServiceUnavailableError,
    error_from_code,
)
from client.protocol import (
    HEALTH_PATH,
    READY_PATH,
    REQUEST_ID_HEADER,
    SEGMENT_PATH,
    ErrorResponse,
    SegmentRequest,
    SegmentResponse,
)
from client.retry import RetryPolicy
from client.video_protocol import (
    VIDEOS_PATH,
    TrackedFrame,
    TrackLine,
    TrackRequest,
    VideoPromptRequest,
    VideoPromptResponse,
    VideoSessionInfo,
    video_session_path,
)

M = TypeVar("M", bound=BaseModel)
OCTET_STREAM = "application/octet-stream"

# Error bodies that are not our JSON (a proxy's HTML page, say) are typed by their status alone.
_ERRORS_BY_STATUS: dict[int, type[Sam3Error]] = {
    401: AuthenticationError,
    404: NotFoundError,
    408: RequestTimeoutError,
    429: ServiceUnavailableError,
    503: ServiceUnavailableError,
    504: RequestTimeoutError,
}
_MAX_BODY_IN_MESSAGE = 500


class HttpApi:
    """Where the service is, and how one call to it is made and read: one definition for the blocking and the
    asyncio HTTP clients, which differ only in how they wait for the network."""

    def __init__(self, base_url: str, route_prefix: str, api_key: str | None):
        self.base_url = base_url.rstrip("/") + _normalized_prefix(route_prefix)
        self._api_key = api_key

    def prepare(self, path: str, json_body: str | None, content_type: str | None = None) -> tuple[str, dict[str, str], str]:
        """The URL, the headers and the request id (sent as X-Request-Id: the server logs a failure under it).
        The body is JSON when `json_body` is given, else of `content_type`, if any."""
        request_id = uuid.uuid4().hex
        if json_body is not None:
            content_type = "application/json"
        return self.base_url + path, self._headers(content_type, request_id), request_id

    def _headers(self, content_type: str | None, request_id: str) -> dict[str, str]:
        """Per request, not on the httpx client, so image URLs fetched with it never see the API key."""
        headers = {REQUEST_ID_HEADER: request_id}
        if content_type is not None:
            headers["content-type"] = content_type
        if self._api_key is not None:
            headers["authorization"] = f"Bearer {self._api_key}"
        return headers


def transport_failure(method: str, url: str, timeout: float | None, error: httpx.HTTPError, request_id: str) -> Sam3Error:
    """A request that got no answer, as a `client.errors` type carrying its request id."""
    failure = _transport_error(method, url, timeout, error)
    failure.request_id = request_id
    return failure


def checked(response: httpx.Response, request_id: str) -> httpx.Response:
    """The answer if it is a success; else its typed error, with the server's Retry-After and request id."""
    if not response.is_success:
        failure = _error_from_response(response)
        failure.retry_after_s = _retry_after_s(response)
        failure.request_id = response.headers.get(REQUEST_ID_HEADER, request_id)
        raise failure
    return response


def segment_response(response: httpx.Response) -> SegmentResponse:
    return parsed(SegmentResponse, response)


def parsed(model: type[M], response: httpx.Response) -> M:
    try:
        return model.model_validate_json(response.content)
    except ValidationError as error:
        raise Sam3Error(f"malformed response from {response.request.url}: {error}") from error


class Sam3HttpClient(SegmentClient, VideoClient):
    """Segment images through the service's HTTP API; one connection pool, so reuse the client."""

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
        transport: httpx.BaseTransport | None = None,
    ):
        """`timeout` is each call's whole budget, retries included (None waits forever); `transport` is for tests.

        Segmenting is idempotent, so 503/429 answers and connection failures are retried `retries` times
        with jittered exponential backoff from `backoff_s` up to `max_backoff_s`; `retries=0` turns that off.
        With `reuse_images`, a call on an image (the same bytes, the same `model_id`) the service answered
        before sends only the id it gave the image, saving the upload and the vision pass; if the service has
        evicted the image since, the bytes are sent again within the same `timeout`.
        """
        self._http = httpx.Client(transport=transport)
        super().__init__(
            timeout=timeout,
            retry_policy=RetryPolicy(retries=retries, backoff_s=backoff_s, max_backoff_s=max_backoff_s),
            image_http=self._http,
            reuse_images=reuse_images,
        )
        self._api = HttpApi(base_url, route_prefix, api_key)
        self.base_url = self._api.base_url

    def health(self) -> bool:
        """True when the service answers its health check (the ingress is up); never raises nor retries."""
        return self._answers(HEALTH_PATH)

    def ready(self) -> bool:
        """True when the service can answer requests (every stage has a running replica): wait on this one
        after a deploy. Never raises nor retries, so it suits polling."""
        return self._answers(READY_PATH)

    def _answers(self, path: str) -> bool:
        try:
            self._send("GET", path, timeout=self.timeout)
        except Sam3Error:
            return False
        return True

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Sam3HttpClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _segment(self, request: SegmentRequest, timeout: float | None) -> SegmentResponse:
        return segment_response(self._send("POST", SEGMENT_PATH, timeout=timeout, json_body=request.model_dump_json()))

    def _send(
        self, method: str, path: str, *, timeout: float | None, json_body: str | None = None, content: bytes | None = None
    ) -> httpx.Response:
        """The network layer: one request, every failure as a `client.errors` type. `content` is sent as bytes."""
        url, headers, request_id = self._api.prepare(path, json_body, None if content is None else OCTET_STREAM)
        try:
            response = self._http.request(method, url, content=json_body or content, headers=headers, timeout=timeout)
        except httpx.HTTPError as error:
            raise transport_failure(method, url, timeout, error, request_id) from error
        return checked(response, request_id)

    # --- video sessions (`client._video` makes them `track()` and the session calls) -----------------------

    def _video_call(self, call: VideoCall, timeout: float | None):
        response = self._send(call.method, call.path, timeout=timeout, json_body=call.json_body, content=call.content)
        return None if call.answer is None else parsed(call.answer, response)

    def _open_video(self, video: bytes | None, model_id: str | None, timeout: float | None) -> VideoSessionInfo:
        return self._video_call(open_video_call(video, model_id), timeout)

    def _prompt_video(self, session_id: str, request: VideoPromptRequest, timeout: float | None) -> VideoPromptResponse:
        return self._video_call(prompt_video_call(session_id, request), timeout)

    def _push_video_frame(self, session_id: str, image: bytes, timeout: float | None) -> TrackedFrame:
        return self._video_call(push_frame_call(session_id, image), timeout)

    def _video_session(self, session_id: str, timeout: float | None) -> VideoSessionInfo:
        return self._video_call(VideoCall("GET", video_session_path(session_id), answer=VideoSessionInfo), timeout)

    def _close_video(self, session_id: str, timeout: float | None) -> None:
        self._video_call(VideoCall("DELETE", video_session_path(session_id)), timeout)

    def _track_video(self, session_id: str, request: TrackRequest, timeout: float | None) -> Iterator[TrackLine]:
        """The stream's lines as they arrive; `timeout` bounds the wait for each."""
        json_body = request.model_dump_json()
        url, headers, request_id = self._api.prepare(video_session_path(session_id, "track"), json_body)
        try:
            with self._http.stream("POST", url, content=json_body, headers=headers, timeout=timeout) as response:
                if not response.is_success:
                    response.read()
                    checked(response, request_id)
                for line in response.iter_lines():
                    if line:
                        yield TrackLine.model_validate_json(line)
        except httpx.HTTPError as error:
            raise transport_failure("POST", url, timeout, error, request_id) from error


@dataclass(frozen=True)
class VideoCall:
    """One video session call over HTTP, for the blocking and the asyncio client alike."""

    method: str
    path: str
    json_body: str | None = None
    content: bytes | None = None
    answer: type[BaseModel] | None = None


def open_video_call(video: bytes | None, model_id: str | None) -> VideoCall:
    path = VIDEOS_PATH if model_id is None else f"{VIDEOS_PATH}?{urlencode({'model_id': model_id})}"
    return VideoCall("POST", path, content=video or b"", answer=VideoSessionInfo)


def prompt_video_call(session_id: str, request: VideoPromptRequest) -> VideoCall:
    path = video_session_path(session_id, "prompts")
    return VideoCall("POST", path, json_body=request.model_dump_json(), answer=VideoPromptResponse)


def push_frame_call(session_id: str, image: bytes) -> VideoCall:
    return VideoCall("POST", video_session_path(session_id, "frames"), content=image, answer=TrackedFrame)


def _normalized_prefix(route_prefix: str) -> str:
    """'', '/', 'sam3', '/sam3/' -> '' or '/sam3', so joining with the API paths gives one slash."""
    stripped = route_prefix.strip("/")
    return f"/{stripped}" if stripped else ""


def _transport_error(method: str, url: str, timeout: float | None, error: httpx.HTTPError) -> Sam3Error:
    if isinstance(error, httpx.TimeoutException):
        return RequestTimeoutError(f"{method} {url} timed out after {timeout} s: {error}")
    if isinstance(error, httpx.TransportError):
        return ConnectionFailedError(f"cannot reach {url}: {error}")
    return Sam3Error(f"{method} {url} failed: {error}")


def _error_from_response(response: httpx.Response) -> Sam3Error:
    """Our JSON error body gives the exact type; any other body is typed by its HTTP status."""
    try:
        detail = ErrorResponse.model_validate_json(response.content).error
    except ValidationError:
        return _error_from_status(response)
    return error_from_code(detail.code, detail.message)


def _retry_after_s(response: httpx.Response) -> float | None:
    """`Retry-After` in seconds (what Serve and proxies send for 503 and 429); the HTTP-date form is ignored."""
    try:
        seconds = float(response.headers["retry-after"])
    except (KeyError, ValueError):
        return None
    return seconds if 0 <= seconds < math.inf else None


def _error_from_status(response: httpx.Response) -> Sam3Error:
    status = response.status_code
    fallback = InvalidRequestError if 400 <= status < 500 else Sam3Error
    error_type = _ERRORS_BY_STATUS.get(status, fallback)
    body = response.text[:_MAX_BODY_IN_MESSAGE]
    return error_type(f"HTTP {status} from {response.request.url}: {body}")
