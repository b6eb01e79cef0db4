"""The ingress's video methods (a mixin of `Sam3Ingress`): what HTTP routes and handle callers call alike.

Each passes one call to the model replica that holds the session (the router reads the replica from the
session's id) and returns its answer or a typed `Sam3Error`, never raising it; the tracking stream ends with an
error line instead. A session whose replica died answers `session_not_found`: its state died with it, so the
caller starts again, never waits.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from client.errors import ModelNotFoundError, Sam3Error, SessionNotFoundError, error_from_code
from client.handle_client import unwrap_ray_error
from client.protocol import ErrorDetail
from client.video_protocol import (
    SESSION_ID_PATTERN,
    TrackedFrame,
    TrackLine,
    TrackRequest,
    VideoPromptRequest,
    VideoPromptResponse,
    VideoSessionInfo,
)
from deployments.config import AppArgs
from deployments.errors import as_sam3_error
from deployments.metrics import UNKNOWN

VIDEO = "video"  # the prompt type video requests are counted under


def session_error(error: BaseException, session_id: str | None) -> Sam3Error:
    """A failed call on a session as its typed error: a replica lost with it is `session_not_found`."""
    if session_id is not None and isinstance(unwrap_ray_error(error), RayActorError):
        return SessionNotFoundError(f"video session {session_id} is gone: its replica was lost; start a new session")
    return as_sam3_error(error)


def check_session_id(session_id: str) -> None:
    if not re.fullmatch(SESSION_ID_PATTERN, session_id):
        raise SessionNotFoundError(f"{session_id!r} is not a video session id")


class VideoIngress:
    """Needs, from the ingress: `args`, `model_pool` and `record_failure(error, model_id, prompt_type)`."""

    args: AppArgs
    model_pool: DeploymentHandle

    async def open_video(self, video: bytes | None = None, model_id: str | None = None) -> VideoSessionInfo | Sam3Error:
        """A session of a video file's frames, or empty for frames sent one by one, on a replica holding the model."""
        try:
            model = self.args.model_id_for(model_id)
        except ModelNotFoundError as error:
            self.record_failure(error, UNKNOWN, VIDEO)  # never a new metrics series per unknown id
            return error
        try:
            pool = self.model_pool.options(multiplexed_model_id=model)
            return await self._answer(pool.open_video.remote(video), None)
        except Sam3Error as error:
            self.record_failure(error, model, VIDEO)
            return error

    async def prompt_video(self, session_id: str, request: VideoPromptRequest) -> VideoPromptResponse | Sam3Error:
        return await self._session_call("prompt_video", session_id, request)

    async def push_video_frame(self, session_id: str, image: bytes) -> TrackedFrame | Sam3Error:
        return await self._session_call("push_video_frame", session_id, image)

    async def video_session(self, session_id: str) -> VideoSessionInfo | Sam3Error:
        return await self._session_call("video_session", session_id)

    async def close_video(self, session_id: str) -> None | Sam3Error:
        return await self._session_call("close_video", session_id)

    async def track_video(self, session_id: str, request: TrackRequest | None = None) -> AsyncIterator[TrackLine]:
        """The session's frames as they are tracked: a line per frame, then `end`, or `error` where it stopped."""
        done = 0
        try:
            check_session_id(session_id)
            lines = self.model_pool.options(stream=True).track_video.remote(request or TrackRequest(), session_id=session_id)
            finished = False
            try:
                async for line in lines:
                    if line.type == "error":
                        raise error_from_code(line.error.code, line.error.message)
                    done = line.done or done
                    yield line
                finished = True
            finally:
                if not finished:  # the reader went away (or the line was an error): stop the replica's tracking
                    lines.cancel()
        except Exception as error:
            typed = error if isinstance(error, Sam3Error) else session_error(error, session_id)
            self.record_failure(typed, UNKNOWN, VIDEO)
            detail = ErrorDetail(code=typed.code, message=typed.message, request_id=typed.request_id)
            yield TrackLine(type="error", done=done, error=detail)

    async def _session_call(self, method: str, session_id: str, *args: Any) -> Any:
        try:
            check_session_id(session_id)
            return await self._answer(getattr(self.model_pool, method).remote(*args, session_id=session_id), session_id)
        except Sam3Error as error:
            self.record_failure(error, UNKNOWN, VIDEO)
            return error

    @staticmethod
    async def _answer(response: DeploymentResponse, session_id: str | None) -> Any:
        try:
            answer = await response
        except Exception as error:
            raise session_error(error, session_id) from None
        if isinstance(answer, Sam3Error):
            raise answer
        return answer
