"""Video files as a stream of RGB frames, decoded with PyAV and refused as soon as they break a limit.

A long video never sits whole in memory: each frame is decoded when the caller asks for the next one, and the
file is closed when the caller stops. Frames come upright: a phone video's rotation (its display matrix) is
applied, as players apply it, so that prompts and masks share the frame people see.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass

import av
import numpy as np

from client.errors import ImageTooLargeError, InvalidVideoError, VideoTooLongError


@dataclass(frozen=True)
class VideoLimits:
    max_frames: int
    max_frame_pixels: int


def video_frames(data: bytes, limits: VideoLimits) -> Iterator[np.ndarray]:
    """The video's frames in display order, each (H, W, 3) uint8 RGB.

    Raises `InvalidVideoError` for a file that is not a video, has no video stream or no frame, or breaks off
    or is damaged (the frames already yielded are whole); `VideoTooLongError` once it passes `limits.max_frames` (at once when
    the container declares more); `ImageTooLargeError` for frames over `limits.max_frame_pixels`.
    """
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.error.FFmpegError, ValueError) as error:
        raise InvalidVideoError(f"not a video file that can be read: {error}") from None
    with container:
        if not container.streams.video:
            raise InvalidVideoError("the file holds no video stream")
        stream = container.streams.video[0]
        if stream.codec_context is None:  # a stream whose codec the header does not describe (a cut file)
            raise InvalidVideoError("the file's video stream cannot be decoded")
        stream.thread_type = "AUTO"
        check_declared(stream.frames, stream.codec_context.width, stream.codec_context.height, limits)
        count = 0
        try:
            for frame in container.decode(stream):
                if count == limits.max_frames:
                    raise VideoTooLongError(f"the video has more than {limits.max_frames} frames, the most accepted")
                if frame.is_corrupt:  # what the decoder made up for data it could not read
                    raise InvalidVideoError(f"the video is damaged at frame {count}")
                yield upright(frame.to_ndarray(format="rgb24"), frame.rotation)
                count += 1
        except av.error.FFmpegError as error:
            raise InvalidVideoError(f"the video cannot be decoded past frame {count}: {error}") from None
    if count == 0:
        raise InvalidVideoError("the video has no frames")


def check_declared(frames: int, width: int, height: int, limits: VideoLimits) -> None:
    """Refuse what the container's header already says is too much (0 frames: not declared)."""
    if frames > limits.max_frames:
        raise VideoTooLongError(f"the video has {frames} frames; at most {limits.max_frames} are accepted")
    if width * height > limits.max_frame_pixels:
        raise ImageTooLargeError(
            f"the video's frames are {width}x{height} = {width * height} pixels; at most {limits.max_frame_pixels}"
        )


def upright(rgb: np.ndarray, rotation: int) -> np.ndarray:
    """The frame as displayed: `rotation` is the degrees counter-clockwise the display matrix turns it by."""
    turns = (rotation // 90) % 4
    return np.ascontiguousarray(np.rot90(rgb, k=turns)) if turns else rgb
