"""The Ray Serve handle client: the same API inside a Ray cluster (a Ray job, a Ray Data task), no HTTP.

The `SegmentRequest` object goes to the ingress deployment's `segment` method as it is and a
`SegmentResponse` comes back, or the typed error (`client.errors`) the request failed with, which the client
raises: the ingress returns it rather than raising it, so that an expected 4xx is not logged by Serve as a
failed call with a traceback. Ray is imported only when a request is made, so `import client` stays light.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from client._api import SegmentClient
from client._video import VideoClient
from client.errors import NotFoundError, RequestTimeoutError, Sam3Error, ServiceUnavailableError, error_from_code
from client.protocol import SegmentRequest, SegmentResponse
from client.retry import RetryPolicy
from client.video_protocol import (
    TrackedFrame,
    TrackLine,
    TrackRequest,
    VideoPromptRequest,
    VideoPromptResponse,
    VideoSessionInfo,
)

# One lock for every client (a lookup happens once per client), so a client still pickles into Ray tasks.
_LOOKUP_LOCK = threading.Lock()


class Sam3HandleClient(SegmentClient, VideoClient):
    """Segment images through the Serve application's handle; construct it anywhere, it connects on first use."""

    def __init__(
        self,
        app_name: str = "sam3",
        *,
        timeout: float | None = 60.0,
        retries: int = 3,
        backoff_s: float = 0.25,
        max_backoff_s: float = 4.0,
        reuse_images: bool = True,
    ):
        """`timeout` is each call's whole wait for the result, retries included (None waits forever).

        Segmenting is idempotent, so back-pressure and dead or unavailable replicas are retried `retries` times
        with jittered exponential backoff from `backoff_s` up to `max_backoff_s`; `retries=0` turns that off.
        With `reuse_images`, a call on an image (the same bytes, the same `model_id`) the service answered
        before sends only the id it gave the image, saving the vision pass; if the service has evicted the
        image since, the bytes are sent again within the same `timeout`. A copy pickled into a Ray task starts
        with no ids.
        """
        super().__init__(
            timeout=timeout,
            retry_policy=RetryPolicy(retries=retries, backoff_s=backoff_s, max_backoff_s=max_backoff_s),
            reuse_images=reuse_images,
        )
        self.app_name = app_name
        self._handle: Any = None
        self._app: Any = None

    def _segment(self, request: SegmentRequest, timeout: float | None) -> SegmentResponse:
        return self._call(self._segment_handle(), timeout, request)

    @staticmethod
    def _call(method: Any, timeout: float | None, *args: Any) -> Any:
        """One call of an ingress method: its answer, or the typed error it returned or failed with."""
        response = None
        try:
            response = method.remote(*args)
            answer = response.result(timeout_s=timeout)
        except Exception as error:
            typed = as_sam3_error(error)
            # Serve's id of this call, which the ingress logs a failure under.
            typed.request_id = response.request_id if response is not None else None
            raise typed from error
        if isinstance(answer, Sam3Error):  # the request failed: the ingress returns its typed error
            typed = as_sam3_error(answer)
            typed.request_id = answer.request_id or response.request_id
            raise typed
        return answer

    # --- video sessions (`client._video` makes them `track()` and the session calls) -----------------------

    def _open_video(self, video: bytes | None, model_id: str | None, timeout: float | None) -> VideoSessionInfo:
        return self._call(self._app_handle().open_video, timeout, video, model_id)

    def _prompt_video(self, session_id: str, request: VideoPromptRequest, timeout: float | None) -> VideoPromptResponse:
        return self._call(self._app_handle().prompt_video, timeout, session_id, request)

    def _push_video_frame(self, session_id: str, image: bytes, timeout: float | None) -> TrackedFrame:
        return self._call(self._app_handle().push_video_frame, timeout, session_id, image)

    def _video_session(self, session_id: str, timeout: float | None) -> VideoSessionInfo:
        return self._call(self._app_handle().video_session, timeout, session_id)

    def _close_video(self, session_id: str, timeout: float | None) -> None:
        self._call(self._app_handle().close_video, timeout, session_id)

    def _track_video(self, session_id: str, request: TrackRequest, timeout: float | None) -> Iterator[TrackLine]:
        """The ingress's stream, line by line as the replica computes them (Serve's streaming handle call)."""
        lines = self._app_handle().options(stream=True).track_video.remote(session_id, request)
        finished = False
        try:
            yield from lines
            finished = True
        except Exception as error:
            finished = True
            raise as_sam3_error(error) from error
        finally:
            if not finished:  # the caller stopped early: so does the tracking
                lines.cancel()

    def _app_handle(self) -> Any:
        """The application's ingress handle, looked up once (after `_segment_handle`'s, under the same lock)."""
        if self._app is None:
            self._segment_handle()
            with _LOOKUP_LOCK:
                if self._app is None:
                    self._app = _get_app_handle(self.app_name)
        return self._app

    def _segment_handle(self) -> Any:
        """Looked up once, on first use, under a lock: a missing application is a `NotFoundError`.

        Bulk calls come here from several threads at once, and Serve refuses to initialize a handle twice
        (a second concurrent first `.remote()` raises), so the `segment` method handle, whose creation
        initializes it, is made here once too.
        """
        if self._handle is None:
            with _LOOKUP_LOCK:
                if self._handle is None:
                    self._handle = self._look_up()
        return self._handle

    def _look_up(self) -> Any:
        from ray.serve.exceptions import RayServeException

        try:
            return _get_app_handle(self.app_name).segment
        except (RayServeException, ValueError) as error:
            raise NotFoundError(f"no Ray Serve application {self.app_name!r}: {error}") from error
        except Exception as error:
            raise as_sam3_error(error) from error


def _get_app_handle(app_name: str) -> Any:
    """The ingress deployment's handle; Ray is imported here and not at module import."""
    from ray import serve

    return serve.get_app_handle(app_name)


def as_sam3_error(error: BaseException) -> Sam3Error:
    """Any failure of a handle call as the `client.errors` type the HTTP client would raise for it."""
    cause = unwrap_ray_error(error)
    if isinstance(cause, Sam3Error):
        return error_from_code(cause.code, cause.message)  # a plain instance, not Ray's RayTaskError subclass
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

    if isinstance(cause, BackPressureError):
        error = ServiceUnavailableError(f"the service is overloaded, retry later: {cause}")
        error.retry_after_s = cause.retry_after_s
        return error
    if isinstance(cause, (RayActorError, DeploymentUnavailableError, ReplicaUnavailableError)):
        # RayActorError covers ActorDiedError and ActorUnavailableError: a replica died or cannot be reached.
        message = getattr(cause, "message", None) or cause
        return ServiceUnavailableError(f"a replica is unavailable, retry later: {type(cause).__name__}: {message}")
    if isinstance(cause, TimeoutError):  # ray.exceptions.GetTimeoutError is a TimeoutError too
        return RequestTimeoutError(f"no result within the timeout: {cause}")
    return Sam3Error(f"{type(cause).__name__}: {cause}")


def unwrap_ray_error(error: BaseException) -> BaseException:
    """The exception the replica raised, without Ray's `RayTaskError` wrappers."""
    from ray.exceptions import RayTaskError

    while isinstance(error, RayTaskError) and error.cause is not None:
        error = error.cause
    return error

