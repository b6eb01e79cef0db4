"""Video tracking in the clients: `track()`, the session calls under it, and `masklets()`, defined once.

A client subclass says how each session call travels (`VideoTransport`'s five methods); the arguments, the
session's lifetime and the conversion of the stream into numpy masks are here, the same for HTTP and the
handle. Video calls are not retried: a session is state on one replica, and a repeated upload is a new one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypedDict, Union

import numpy as np
from PIL import Image
from pydantic import ValidationError
from typing_extensions import Unpack

from client.errors import InvalidPromptError, InvalidRequestError, error_from_code
from client.images import encode_image
from client.rle import decode_mask
from client.video_protocol import (
    ObjectPrompt,
    TrackedFrame,
    TrackLine,
    TrackRequest,
    VideoPromptRequest,
    VideoPromptResponse,
    VideoSessionInfo,
)

# A video file (its path or bytes), or its frames (numpy RGB arrays or PIL images) in order.
VideoInput = Union[str, Path, bytes, bytearray, Iterable[Union[np.ndarray, Image.Image]]]


class TrackOptions(TypedDict, total=False):
    """How `track()` and `track_session()` track, and answer (one definition for the blocking and asyncio clients)."""

    start_frame: int | None  # the first frame answered; none: frame 0 for concepts, the first prompted for objects
    max_frames: int | None  # at most this many frames answered
    reverse: bool  # backward, down to frame 0
    rle_masks: bool  # masks as COCO RLE dicts instead of uint8 0/255 arrays


def track_request(options: TrackOptions) -> tuple[TrackRequest, bool]:
    """The request for the options, and whether masks stay RLE; a misspelt option is a TypeError, as for a
    keyword argument."""
    unknown = sorted(set(options) - set(TrackOptions.__annotations__))
    if unknown:
        raise TypeError(f"unexpected keyword argument {unknown[0]!r}")
    request = TrackRequest(
        start_frame=options.get("start_frame"), max_frames=options.get("max_frames"), reverse=options.get("reverse", False)
    )
    return request, options.get("rle_masks", False)


def video_prompt(
    text: str | Sequence[str] | None = None,
    points: Any = None,
    labels: Any = None,
    boxes: Any = None,
    frame: int = 0,
    object_ids: Sequence[int] | None = None,
) -> VideoPromptRequest:
    """The prompt for `track()`'s arguments.

    `text`: every instance of a concept (or of each of several). `points` with `labels`: one object from
    `[[x, y], ...]`, or several from `[[[x, y], ...], ...]` with labels nested alike. `boxes`: one object per
    `[x0, y0, x1, y1]` (labels, if given, must all be 1: a box is an object to follow). Objects are prompted on
    `frame` and get `object_ids` (default 1, 2, ...).
    """
    given = [name for name, value in (("text", text), ("points", points), ("boxes", boxes)) if value is not None]
    if len(given) != 1:
        raise InvalidPromptError(f"give exactly one of text, points or boxes (got {', '.join(given) or 'none'})")
    try:
        if text is not None:
            return VideoPromptRequest(text=text if isinstance(text, str) else list(text))
        objects = _point_objects(points, labels) if points is not None else _box_objects(boxes, labels)
        ids = list(object_ids) if object_ids is not None else list(range(1, len(objects) + 1))
        if len(ids) != len(objects):
            raise InvalidPromptError(f"{len(objects)} objects but {len(ids)} object_ids")
        prompts = [ObjectPrompt(object_id=object_id, **fields) for object_id, fields in zip(ids, objects)]
        return VideoPromptRequest(objects=prompts, frame_index=frame)
    except ValidationError as error:
        raise InvalidPromptError(f"invalid prompt: {error.errors()[0]['msg']}") from None


def _point_objects(points: Any, labels: Any) -> list[dict]:
    points, labels = _plain(points), _plain(labels)
    if labels is None:
        raise InvalidPromptError("points need labels: 1 on the object, 0 not on it")
    one_object = bool(points) and isinstance(points[0], (list, tuple)) and not isinstance(points[0][0], (list, tuple))
    if one_object:
        points, labels = [points], [labels]
    nested = isinstance(labels, (list, tuple)) and all(isinstance(each, (list, tuple)) for each in labels)
    if not nested or len(labels) != len(points):
        raise InvalidPromptError("give the labels nested like the points: one list of labels per object")
    return [{"points": object_points, "labels": object_labels} for object_points, object_labels in zip(points, labels)]


def _box_objects(boxes: Any, labels: Any) -> list[dict]:
    boxes, labels = _plain(boxes), _plain(labels)
    if labels is not None and list(labels) != [1] * len(boxes):
        raise InvalidPromptError("a box in a video is an object to follow: its label must be 1")
    return [{"box": box} for box in boxes]


def _plain(value: Any) -> Any:
    return value.tolist() if isinstance(value, np.ndarray) else value


def frame_result(frame: TrackedFrame, rle_masks: bool = False) -> dict[str, Any]:
    """One frame's objects as `run_with_detections` gives instances: uint8 0/255 masks (or, with `rle_masks`,
    the COCO RLE dicts the service sent, for callers that store them), pixel boxes."""
    return {
        "frame_index": frame.frame_index,
        "object_ids": [obj.object_id for obj in frame.objects],
        "masks": [obj.mask.model_dump() if rle_masks else decode_mask(obj.mask) for obj in frame.objects],
        "boxes": [list(obj.box) for obj in frame.objects],
        "scores": [obj.score for obj in frame.objects],
        "prompts": [obj.prompt for obj in frame.objects],
    }


def masklets(frames: Iterable[dict[str, Any]]) -> dict[int, dict[int, np.ndarray]]:
    """`track()`'s frames collected per object: object id -> frame index -> mask (a later result for a frame
    replaces an earlier one, as a correction's tracking does)."""
    collected: dict[int, dict[int, np.ndarray]] = {}
    for frame in frames:
        for object_id, mask in zip(frame["object_ids"], frame["masks"]):
            collected.setdefault(object_id, {})[frame["frame_index"]] = mask
    return collected


def line_frame(line: TrackLine, rle_masks: bool = False) -> dict[str, Any] | None:
    """A stream line's frame (None for the end line); an error line raises the error that stopped the stream."""
    if line.type == "error":
        raise error_from_code(line.error.code, line.error.message)
    return frame_result(line.frame, rle_masks) if line.type == "frame" else None


def frames_of(lines: Iterable[TrackLine], rle_masks: bool = False) -> Iterator[dict[str, Any]]:
    """A tracking stream's frames; the error that stopped it is raised where it comes."""
    for line in lines:
        frame = line_frame(line, rle_masks)
        if frame is not None:
            yield frame


class VideoTransport(ABC):
    """How each session call travels; every method raises the call's typed error."""

    @abstractmethod
    def _open_video(self, video: bytes | None, model_id: str | None, timeout: float | None) -> VideoSessionInfo: ...

    @abstractmethod
    def _prompt_video(self, session_id: str, request: VideoPromptRequest, timeout: float | None) -> VideoPromptResponse: ...

    @abstractmethod
    def _push_video_frame(self, session_id: str, image: bytes, timeout: float | None) -> TrackedFrame: ...

    @abstractmethod
    def _track_video(self, session_id: str, request: TrackRequest, timeout: float | None) -> Iterator[TrackLine]: ...

    @abstractmethod
    def _video_session(self, session_id: str, timeout: float | None) -> VideoSessionInfo: ...

    @abstractmethod
    def _close_video(self, session_id: str, timeout: float | None) -> None: ...


class VideoClient(VideoTransport, ABC):
    """`track()` and the session calls for the blocking clients. `timeout` bounds each call (a stream's
    wait for each line), not a whole video."""

    timeout: float | None

    def track(
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
    ) -> Iterator[dict[str, Any]]:
        """Track a concept (`text`) or prompted objects (`points` with `labels`, or `boxes`, on `frame`) through a
        video, yielding each frame's objects as the service computes them: `frame_index`, `object_ids`, `masks`
        (uint8 0/255; with `rle_masks`, COCO RLE dicts), `boxes`, `scores` and, for concepts, the `prompts` that
        found them.

        The session is made, prompted, tracked and ended within the call (ended too when the caller stops
        early). For corrections on later frames, or frames from a live source, use the session calls.
        """
        prompt = video_prompt(text, points, labels, boxes, frame, object_ids)
        track_request(options)  # a misspelt option fails before the upload
        session = self.open_video(video, model_id=model_id, timeout=timeout)
        try:
            self._prompt_video(session.session_id, prompt, self._call_timeout(timeout))
            yield from self.track_session(session.session_id, timeout=timeout, **options)
        finally:
            self.close_video(session.session_id, timeout=timeout)

    def open_video(self, video: VideoInput | None = None, *, model_id: str | None = None, timeout: float | None = None) -> VideoSessionInfo:
        """A session of a video file (a path or its bytes, uploaded as it is), of frames (sent one by one), or
        empty (`None`: frames come later through `push_frame`)."""
        timeout = self._call_timeout(timeout)
        if video is None or isinstance(video, (str, Path, bytes, bytearray)):
            data = None if video is None else video_bytes(video)
            return self._open_video(data, model_id, timeout)
        session = self._open_video(None, model_id, timeout)
        try:
            for rgb in video:
                self._push_video_frame(session.session_id, encode_image(rgb, timeout=timeout), timeout)
        except BaseException:
            self.close_video(session.session_id, timeout=timeout)
            raise
        return self._video_session(session.session_id, timeout)

    def prompt_video(
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
        """Prompt a session (`track()`'s prompt arguments): texts start its tracking again; objects are added
        on `frame`, or corrected there, and that frame's result is returned."""
        request = video_prompt(text, points, labels, boxes, frame, object_ids)
        answer = self._prompt_video(session_id, request, self._call_timeout(timeout))
        return None if answer.frame is None else frame_result(answer.frame)

    def track_session(
        self,
        session_id: str,
        *,
        timeout: float | None = None,
        **options: Unpack[TrackOptions],
    ) -> Iterator[dict[str, Any]]:
        """A prompted session's frames as they are tracked (see `track()`)."""
        request, rle_masks = track_request(options)
        yield from frames_of(self._track_video(session_id, request, self._call_timeout(timeout)), rle_masks)

    def push_frame(self, session_id: str, frame: np.ndarray | Image.Image | bytes, *, timeout: float | None = None) -> dict[str, Any]:
        """One more frame of a live source, tracked on arrival (before the first prompt it is only stored)."""
        timeout = self._call_timeout(timeout)
        return frame_result(self._push_video_frame(session_id, encode_image(frame, timeout=timeout), timeout))

    def video_session(self, session_id: str, *, timeout: float | None = None) -> VideoSessionInfo:
        """What the session holds: its frames, their size, its task."""
        return self._video_session(session_id, self._call_timeout(timeout))

    def close_video(self, session_id: str, *, timeout: float | None = None) -> None:
        """End the session and free its replica's memory (ending one already gone is not an error)."""
        self._close_video(session_id, self._call_timeout(timeout))

    def _call_timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout


def video_bytes(video: str | Path | bytes | bytearray) -> bytes:
    if isinstance(video, (bytes, bytearray)):
        return bytes(video)
    if str(video).lower().startswith(("http://", "https://")):
        raise InvalidRequestError("give a video file's path or bytes: the client does not download videos")
    try:
        return Path(video).read_bytes()
    except OSError as error:
        raise InvalidRequestError(f"cannot read video file {video}: {error.strerror or error}") from error
