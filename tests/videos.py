"""Short generated videos for the tests: shapes moving over a plain background, encoded with PyAV."""

from __future__ import annotations

import io

import av
import numpy as np


def moving_shapes(frames: int, height: int = 72, width: int = 96) -> list[np.ndarray]:
    """`frames` RGB frames: a square moving right and a disc moving down, each frame different."""
    rows, cols = np.mgrid[:height, :width]
    video = []
    for index in range(frames):
        frame = np.full((height, width, 3), (30, 60, 90), dtype=np.uint8)
        left = (5 + 4 * index) % (width - 20)
        frame[10:30, left : left + 20] = (220, 40, 40)
        centre_row = (20 + 3 * index) % (height - 12) + 6
        frame[(rows - centre_row) ** 2 + (cols - 60) ** 2 <= 36] = (40, 220, 60)
        video.append(frame)
    return video


def encode_video(frames: list[np.ndarray], container: str = "mp4", codec: str = "mpeg4", fps: int = 10) -> bytes:
    """The frames as a video file's bytes. `codec="ffv1"` (in `container="matroska"`) is lossless."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container) as output:
        stream = output.add_stream(codec, rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "bgr0" if codec == "ffv1" else "yuv420p"
        for frame in frames:
            output.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        output.mux(stream.encode())
    return buffer.getvalue()
