"""The video job's two engines, as Ray Data callable classes: each takes a batch of (video, prompt) rows and
returns the videos' rows (`pipelines.video_rows.TRACK_SCHEMA`), one video at a time.

`ServiceTracker` tracks through the live Serve application (its handle client's `track`), so a job and online
traffic share the model pool. `SessionTracker` loads the models itself and tracks in a `VideoSession`, the
code a model replica runs, for a cluster dedicated to the job. A video that fails is one row with its error
code; the job goes on.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from client._video import video_prompt
from client.errors import InvalidRequestError
from client.handle_client import Sam3HandleClient
from deployments.config import AppArgs
from pipelines.video_rows import error_row, to_table, video_prompt_spec, video_rows


def read_video(path: str) -> bytes:
    """A local path or any URI pyarrow opens (s3://, gs://, ...)."""
    try:
        filesystem, location = pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), path)
        with filesystem.open_input_stream(location) as stream:
            return stream.readall()
    except (OSError, pa.ArrowInvalid) as error:
        raise InvalidRequestError(f"cannot read video {path}: {error}") from None


def _track_batch(batch: pa.Table, track) -> pa.Table:
    rows: list[dict[str, Any]] = []
    for video, prompt in zip(batch["video"].to_pylist(), batch["prompt"].to_pylist()):
        try:
            frames = list(track(read_video(video), video_prompt_spec(prompt)))
            rows.extend(video_rows(video, prompt, frames, len(frames)))
        except Exception as error:
            rows.append(error_row(video, prompt, error))
    return to_table(rows)


def _wire_frame(frame) -> dict[str, Any]:
    """A wire `TrackedFrame` as `video_rows` reads frames."""
    return {"frame_index": frame.frame_index, "objects": [obj.model_dump() for obj in frame.objects]}


class ServiceTracker:
    def __init__(self, app_name: str, timeout_s: float):
        """`timeout_s` bounds each call of a video's session (the stream's wait for each frame)."""
        self.client = Sam3HandleClient(app_name, timeout=timeout_s, retries=0)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return _track_batch(batch, self._track)

    def _track(self, data: bytes, spec: dict[str, Any]):
        for frame in self.client.track(data, rle_masks=True, **spec):
            yield {
                "frame_index": frame["frame_index"],
                "objects": [
                    {"object_id": object_id, "mask": mask, "box": box, "score": score, "prompt": prompt}
                    for object_id, mask, box, score, prompt in zip(
                        frame["object_ids"], frame["masks"], frame["boxes"], frame["scores"], frame["prompts"]
                    )
                ],
            }


class SessionTracker:
    def __init__(self, args: AppArgs):
        """The application's own `args` (checkpoint, device, limits), so both engines answer alike."""
        import torch

        from sam3_serve_core.checkpoint import load_sam3, resolve_device
        from sam3_serve_core.video_frames import VideoLimits
        from sam3_serve_core.video_tracking import load_video_models

        if args.torch_threads is not None:
            torch.set_num_threads(args.torch_threads)
        checkpoint = args.checkpoint
        self.models = load_video_models(checkpoint, load_sam3(checkpoint, resolve_device(args.device), args.dtype))
        self.limits = VideoLimits(max_frames=args.video.max_frames, max_frame_pixels=args.video.max_frame_pixels)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return _track_batch(batch, self._track)

    def _track(self, data: bytes, spec: dict[str, Any]):
        from sam3_serve_core.video_frames import video_frames
        from sam3_serve_core.video_tracking import VideoSession, apply_prompt, to_wire

        request = video_prompt(**spec)
        session = VideoSession(self.models, max_frames=self.limits.max_frames)
        for rgb in video_frames(data, self.limits):
            session.add_frame(rgb)
        apply_prompt(session, request)
        _, tracked = session.propagate()
        for frame in tracked:
            yield _wire_frame(to_wire(frame))
