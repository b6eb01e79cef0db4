"""Video sessions on a model replica: the model pool's methods for them (a mixin of `Sam3ModelPool`).

A session's frames and tracking state stay on the replica that made it; its id names that replica, and the
request router sends each of its requests there (`deployments.routing`). Every torch call runs on the
replica's model threads, a few frames per call, so image batches keep running between them. A session
serves one request at a time (its lock): a stream holds it until the stream ends or its reader goes away.
Errors are returned as typed `Sam3Error`s (in a stream, as its last line), never raised.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
from ray import serve

from client.errors import Sam3Error, SessionNotFoundError
from client.protocol import ErrorDetail
from client.video_protocol import (
    TrackedFrame,
    TrackLine,
    TrackRequest,
    VideoPromptRequest,
    VideoPromptResponse,
    VideoSessionInfo,
)
from deployments.config import AppArgs
from deployments.metrics import ModelPoolMetrics
from sam3_serve_core import video_tracking
from sam3_serve_core.images import decode_image
from sam3_serve_core.video_frames import VideoLimits, video_frames
from sam3_serve_core.video_sessions import SessionLimits, VideoSessions
from sam3_serve_core.video_tracking import VideoModels, VideoSession, apply_prompt, load_video_models, to_wire

logger = logging.getLogger("ray.serve")

# Frames decoded and processed per call on a model thread: image batches run between such calls.
FRAMES_PER_STEP = 8
# How often idle sessions are swept and what the replica holds is reported: a quarter of the idle timeout,
# within these bounds.
SWEEP_EVERY_S = (1.0, 10.0)
MODEL_UNLOADED = "model_unloaded"  # why a session ended, beside video_sessions' own reasons


@dataclass
class HeldSession:
    model_id: str
    session: VideoSession
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def session_token(session_id: str, replica_id: str) -> str:
    """The replica's own key for a session id; an id made by another replica was never held here."""
    holder, _, token = session_id.rpartition(".")
    if holder != replica_id:
        raise SessionNotFoundError(
            f"video session {session_id} is gone: its replica is no longer running; start a new session"
        )
    return token


def add_frames(session: VideoSession, frames: Iterator[np.ndarray], count: int) -> int:
    """Up to `count` more frames of `frames` into the session; how many were added."""
    added = 0
    for rgb in frames:
        session.add_frame(rgb)
        added += 1
        if added == count:
            break
    return added


class VideoReplica:
    """Needs, from the model pool: `_args`, `_held` (the models it holds, by id), `_loaded_model(model_id)`,
    `_on_model_thread(function, *args)` and `metrics`."""

    _args: AppArgs
    _held: Mapping[str, object]
    metrics: ModelPoolMetrics

    def _init_video(self) -> None:
        """Called from the replica's constructor, on its event loop, where the sweep of idle sessions runs."""
        video = self._args.video
        self._video_limits = VideoLimits(max_frames=video.max_frames, max_frame_pixels=video.max_frame_pixels)
        self._video_sessions: VideoSessions[HeldSession] = VideoSessions(
            SessionLimits(video.sessions_per_replica, video.session_bytes_per_replica, video.idle_timeout_s),
            on_end=self._session_ended,
        )
        self._video_models_lock = threading.Lock()
        self._replica_id = serve.get_replica_context().replica_id.unique_id
        # Held here: the event loop keeps only a weak reference to its tasks.
        self._video_sweep = asyncio.get_running_loop().create_task(self._sweep_video_sessions())

    async def _sweep_video_sessions(self) -> None:
        low, high = SWEEP_EVERY_S
        period = min(max(self._args.video.idle_timeout_s / 4, low), high)
        while True:
            await asyncio.sleep(period)
            try:
                self._sweep_video_sessions_once()
            except Exception:  # a sweep that fails is logged; the next one runs
                logger.exception("sweeping the video sessions failed")

    def _sweep_video_sessions_once(self) -> None:
        """End the sessions that are idle or whose model was unloaded even when no video request comes, for
        their memory is the device's (a session holds its model's weights), and report what the replica holds."""
        self._video_sessions.expire_idle()
        for token, held, _ in self._video_sessions.holdings():
            if held.model_id not in self._held:
                self._end_for_unloaded_model(token, held)
        self.metrics.observe_video_sessions(self._args.models, self.video_sessions_held())

    def _end_for_unloaded_model(self, token: str, held: HeldSession) -> None:
        self._video_sessions.close(token, f"its model {held.model_id} was unloaded from the replica", MODEL_UNLOADED)

    def _session_ended(self, held: HeldSession, reason: str) -> None:
        self.metrics.video_sessions_ended.inc(tags={"model_id": held.model_id, "reason": reason})

    def video_sessions_held(self) -> dict[str, dict[str, int]]:
        """Per model, the sessions held and their bytes (for `stats()`)."""
        held: dict[str, dict[str, int]] = {}
        for _, session, nbytes in self._video_sessions.holdings():
            counts = held.setdefault(session.model_id, {"sessions": 0, "bytes": 0})
            counts["sessions"] += 1
            counts["bytes"] += nbytes
        return held

    async def open_video(self, video: bytes | None) -> VideoSessionInfo | Sam3Error:
        """A new session on this replica, of the video file's frames (decoded as a stream), or empty (frames
        then come one by one). Its model is the request's multiplexed model id."""
        model_id = serve.get_multiplexed_model_id() or self._args.default_model
        token = None
        try:
            loaded = await self._loaded_model(model_id)
            models = await self._on_model_thread(self._video_models_of, loaded)
            held = HeldSession(model_id, VideoSession(models, max_frames=self._video_limits.max_frames))
            token = self._video_sessions.open(held, 0)
            if video:
                async with held.lock:
                    await self._add_video(token, held.session, video)
            return self._info(token, held)
        except Sam3Error as error:
            if token is not None:
                self._video_sessions.close(token)
            return error

    async def _add_video(self, token: str, session: VideoSession, video: bytes) -> None:
        frames = video_frames(video, self._video_limits)
        try:
            while await self._on_model_thread(add_frames, session, frames, FRAMES_PER_STEP) == FRAMES_PER_STEP:
                self._video_sessions.resize(token, session.nbytes())  # past the replica's bytes: video_too_long
        finally:
            frames.close()
        self._video_sessions.resize(token, session.nbytes())

    def _video_models_of(self, loaded) -> VideoModels:
        """The model's video half, loaded with its first session (on a model thread)."""
        with self._video_models_lock:
            if loaded.video is None:
                loaded.video = load_video_models(self._args.models[loaded.model_id], loaded.models)
                logger.info("model %s: video models loaded", loaded.model_id)
            return loaded.video

    async def prompt_video(self, request: VideoPromptRequest, session_id: str) -> VideoPromptResponse | Sam3Error:
        """Texts (tracking starts again) or objects on a frame (that frame is segmented and answered)."""
        try:
            token, held = self._held_session(session_id)
            async with held.lock:
                frame = await self._on_model_thread(self._encoded, apply_prompt, held.session, request)
                self._video_sessions.resize(token, held.session.nbytes())
            return VideoPromptResponse(session=self._info(token, held), frame=frame)
        except Sam3Error as error:
            return error

    async def track_video(self, request: TrackRequest, session_id: str) -> AsyncIterator[TrackLine]:
        """The session's frames tracked, one line per frame as it is computed, then an end (or error) line."""
        done = 0
        try:
            token, held = self._held_session(session_id)
            async with held.lock:
                total, tracked = await self._on_model_thread(
                    held.session.propagate, request.start_frame, request.max_frames, request.reverse
                )
                while (frame := await self._on_model_thread(self._encoded, next, tracked, None)) is not None:
                    self._video_sessions.get(token)  # in use: a long stream is never idle, nor evicted first
                    self._count_frame(held)
                    done += 1
                    yield TrackLine(type="frame", frame=frame, done=done, total=total)
                self._video_sessions.resize(token, held.session.nbytes())
            yield TrackLine(type="end", done=done, total=total)
        except Sam3Error as error:
            yield TrackLine(type="error", done=done, error=ErrorDetail(code=error.code, message=error.message))

    async def push_video_frame(self, image: bytes, session_id: str) -> TrackedFrame | Sam3Error:
        """One frame from a live source, tracked as it arrives (only stored before the first prompt)."""
        try:
            token, held = self._held_session(session_id)
            rgb = await asyncio.to_thread(decode_image, image, max_pixels=self._video_limits.max_frame_pixels)
            async with held.lock:
                frame = await self._on_model_thread(self._encoded, held.session.track_new_frame, rgb)
                self._video_sessions.resize(token, held.session.nbytes())
            if held.session.task is not None:
                self._count_frame(held)
            return frame
        except Sam3Error as error:
            return error

    async def video_session(self, session_id: str) -> VideoSessionInfo | Sam3Error:
        try:
            token, held = self._held_session(session_id)
            return self._info(token, held)
        except Sam3Error as error:
            return error

    async def close_video(self, session_id: str) -> None:
        """End the session (ending one already gone, or held by a lost replica, is not an error)."""
        try:
            self._video_sessions.close(session_token(session_id, self._replica_id))
        except SessionNotFoundError:
            pass

    def _held_session(self, session_id: str) -> tuple[str, HeldSession]:
        """The session, which ends with its model: once multiplexing has unloaded the model, the session would
        otherwise keep its weights on the device."""
        token = session_token(session_id, self._replica_id)
        held = self._video_sessions.get(token)
        if held.model_id not in self._held:
            self._end_for_unloaded_model(token, held)
            held = self._video_sessions.get(token)  # raises, saying why
        return token, held

    def _count_frame(self, held: HeldSession) -> None:
        self.metrics.video_frames.inc(tags={"model_id": held.model_id, "task": held.session.task})

    def _info(self, token: str, held: HeldSession) -> VideoSessionInfo:
        session = held.session
        return VideoSessionInfo(
            session_id=f"{self._replica_id}.{token}",
            model_id=held.model_id,
            frames=session.frame_count,
            width=session.width,
            height=session.height,
            task=session.task,
        )

    @staticmethod
    def _encoded(function: Callable[..., video_tracking.TrackedFrame | None], *args) -> TrackedFrame | None:
        """`function(*args)`'s frame on the wire, encoded on the same model thread."""
        tracked = function(*args)
        return None if tracked is None else to_wire(tracked)
