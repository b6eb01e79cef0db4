"""The video wire format: sessions, prompts and the per-frame stream, shared by the server and the clients.

A session lives on one model replica. It is made from an uploaded video file (or empty, for frames sent one
by one), prompted with texts (every instance of each concept) or with objects (points or a box on a frame,
each object under its own id), then tracked: the answer is a stream of `TrackLine`s, one JSON object a line
over HTTP (`application/x-ndjson`), each frame's objects as soon as they are computed.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from client.errors import InvalidPromptError
from client.protocol import API_VERSION, ErrorDetail, RleMask, WireModel, check_geometry, check_texts

VIDEOS_PATH = f"/{API_VERSION}/videos"
NDJSON = "application/x-ndjson"
# A session's id: the replica that holds it, then a random token (`deployments.routing` reads the replica).
SESSION_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}\.[0-9a-f]{32}$"

VideoTask = Literal["concepts", "objects"]


def video_session_path(session_id: str, action: str = "") -> str:
    return f"{VIDEOS_PATH}/{session_id}" + (f"/{action}" if action else "")


class VideoSessionInfo(WireModel):
    session_id: str = Field(description="Name it in the session's requests; it says which replica holds the session.")
    model_id: str
    frames: int = Field(description="Frames the session holds.")
    width: int | None = Field(description="The frames' width in pixels (null before the first frame).")
    height: int | None
    task: VideoTask | None = Field(description="What the session tracks, set by its first prompt.")


class ObjectPrompt(WireModel):
    """One object to track: points with labels (1 on the object, 0 not on it), a box, or both, in pixels."""

    object_id: int = Field(ge=0, description="The object's id in every frame's answer.")
    points: list[list[float]] | None = None
    labels: list[int] | None = None
    box: list[float] | None = Field(None, description="[x0, y0, x1, y1]")

    @model_validator(mode="after")
    def _points_or_box(self) -> ObjectPrompt:
        if self.points is None and self.box is None:
            raise InvalidPromptError(f"object {self.object_id}: give points with labels, a box, or both")
        if self.points is not None:
            check_geometry("points", self.points, self.labels)
        elif self.labels is not None:
            raise InvalidPromptError(f"object {self.object_id}: labels go with points")
        if self.box is not None:
            check_geometry("boxes", [self.box], [1])
        return self


class VideoPromptRequest(WireModel):
    """Texts for the whole video (concepts), or objects on one frame (new ones, or corrections)."""

    text: str | list[str] | None = Field(None, description="A concept, or several: every instance is tracked.")
    objects: list[ObjectPrompt] | None = Field(None, description="Objects prompted on `frame_index`.")
    frame_index: int = Field(0, ge=0, description="The frame the objects are prompted on.")

    @model_validator(mode="after")
    def _one_kind(self) -> VideoPromptRequest:
        if (self.text is None) == (self.objects is None):
            raise InvalidPromptError("prompt a video session with exactly one of `text` and `objects`")
        if self.text is not None:
            check_texts(self.text)
        elif not self.objects:
            raise InvalidPromptError("objects must be a non-empty list")
        elif len({prompt.object_id for prompt in self.objects}) != len(self.objects):
            raise InvalidPromptError("each object may appear once per prompt")
        return self

    @property
    def texts(self) -> list[str]:
        return [self.text] if isinstance(self.text, str) else list(self.text or [])


class TrackedObject(WireModel):
    object_id: int
    mask: RleMask
    box: tuple[float, float, float, float] = Field(description="Pixel xyxy.")
    score: float
    prompt: str | None = Field(None, description="For concepts: the text that found it.")


class TrackedFrame(WireModel):
    """One frame's objects in ascending id; an object not visible on the frame is left out."""

    frame_index: int
    objects: list[TrackedObject] = Field(default_factory=list)


class VideoPromptResponse(WireModel):
    session: VideoSessionInfo
    frame: TrackedFrame | None = Field(None, description="For objects: the prompted frame, segmented.")


class TrackRequest(WireModel):
    start_frame: int | None = Field(
        None, ge=0, description="Where tracking starts: by default frame 0 for concepts, the first prompted frame for objects."
    )
    max_frames: int | None = Field(None, ge=1, description="Track at most this many frames; none: to the video's end.")
    reverse: bool = Field(False, description="Track backward, toward frame 0.")


class TrackLine(WireModel):
    """One line of a tracking stream: a frame with its progress, the end, or the error that stopped it."""

    type: Literal["frame", "end", "error"]
    frame: TrackedFrame | None = None
    done: int | None = Field(None, description="Frames answered so far in this stream.")
    total: int | None = Field(None, description="Frames this stream will answer.")
    error: ErrorDetail | None = None
