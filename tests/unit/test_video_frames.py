"""Video decoding (PyAV), without the model: frames as encoded, limits refused early, bad files typed."""

from __future__ import annotations

import numpy as np
import pytest

from client.errors import ImageTooLargeError, InvalidVideoError, VideoTooLongError
from sam3_serve_core.video_frames import VideoLimits, upright, video_frames
from tests.videos import encode_video, moving_shapes

ROOMY = VideoLimits(max_frames=1000, max_frame_pixels=10**7)


def test_a_lossless_video_decodes_to_the_frames_that_were_encoded():
    frames = moving_shapes(6)
    decoded = list(video_frames(encode_video(frames, "matroska", "ffv1"), ROOMY))
    assert len(decoded) == 6
    for original, back in zip(frames, decoded):
        assert back.dtype == np.uint8 and back.shape == original.shape
        np.testing.assert_array_equal(back, original)


@pytest.mark.parametrize(("container", "codec"), [("mp4", "mpeg4"), ("mp4", "libx264"), ("matroska", "libvpx-vp9")])
def test_lossy_videos_decode_close_to_their_frames(container, codec):
    frames = moving_shapes(8)
    decoded = list(video_frames(encode_video(frames, container, codec), ROOMY))
    assert len(decoded) == 8
    for original, back in zip(frames, decoded):
        assert np.abs(back.astype(int) - original).mean() < 12


def test_frames_come_one_at_a_time_as_asked():
    """The decoder is lazy: a caller that stops after two frames has decoded no more than it needed."""
    frames = video_frames(encode_video(moving_shapes(30), "mpegts", "mpeg4"), VideoLimits(5, 10**7))
    assert next(frames).shape == (72, 96, 3) and next(frames).shape == (72, 96, 3)
    frames.close()


def test_a_video_longer_than_the_limit_is_refused():
    declared = encode_video(moving_shapes(12))  # mp4 declares its frame count: refused before any frame
    with pytest.raises(VideoTooLongError, match="12 frames; at most 10"):
        next(video_frames(declared, VideoLimits(10, 10**7)))
    undeclared = encode_video(moving_shapes(12), "mpegts", "mpeg4")  # refused once the 11th frame comes
    taken = []
    with pytest.raises(VideoTooLongError, match="more than 10 frames"):
        for frame in video_frames(undeclared, VideoLimits(10, 10**7)):
            taken.append(frame)
    assert len(taken) == 10


def test_frames_over_the_pixel_limit_are_refused():
    with pytest.raises(ImageTooLargeError, match="96x72 = 6912 pixels; at most 6000"):
        next(video_frames(encode_video(moving_shapes(3)), VideoLimits(100, 6000)))


@pytest.mark.parametrize("data", [b"", b"not a video at all", b"\x00" * 4096])
def test_what_is_not_a_video_is_an_invalid_video(data):
    with pytest.raises(InvalidVideoError, match="not a video file"):
        list(video_frames(data, ROOMY))


def test_a_video_without_frames_is_an_invalid_video():
    """An MPEG-TS stream cut after its tables: a video stream, and no frame in it."""
    with pytest.raises(InvalidVideoError, match="no frames"):
        list(video_frames(encode_video(moving_shapes(12), "mpegts", "mpeg4")[: 3 * 188], ROOMY))


@pytest.mark.parametrize(("container", "codec"), [("mp4", "mpeg4"), ("mp4", "libx264"), ("matroska", "libvpx-vp9"), ("mpegts", "mpeg4")])
@pytest.mark.parametrize("kept", [0.1, 0.4, 0.7, 0.95])
def test_a_cut_file_gives_the_frames_before_the_cut_or_a_typed_error(container, codec, kept):
    """Never another exception, a hang, or a frame that was not in the video (a damaged frame, which FFmpeg
    fills in as best it can, ends the video with the error)."""
    frames = moving_shapes(12)
    data = encode_video(frames, container, codec)
    decoded = []
    try:
        for frame in video_frames(data[: int(len(data) * kept)], ROOMY):
            decoded.append(frame)
    except InvalidVideoError:
        pass
    assert len(decoded) < len(frames)
    for original, back in zip(frames, decoded):
        assert np.abs(back.astype(int) - original).mean() < 12


def test_a_rotated_video_frame_is_turned_upright():
    frame = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    assert upright(frame, 0) is frame
    np.testing.assert_array_equal(upright(frame, 90), np.rot90(frame))  # counter-clockwise, as the matrix says
    np.testing.assert_array_equal(upright(frame, -90), np.rot90(frame, k=-1))
    np.testing.assert_array_equal(upright(frame, 180), frame[::-1, ::-1])
    assert upright(frame, 90).shape == (3, 2, 3)
