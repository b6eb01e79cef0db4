"""The video job's rows, without Ray: one row per (video, frame, object), and which videos are done.

A video is identified by its path (as listed) and its prompt in canonical JSON. Every frame tracked has at
least one row (a frame with no object has one row whose object columns are null), and every row carries the
count of frames tracked, so a video whose rows a crash cut short is recognised and redone. A video that
fails has one row with its error code and no frame.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from client.errors import InvalidPromptError, Sam3Error

VIDEO_PROMPT_KEYS = {"text", "points", "labels", "boxes", "frame", "object_ids"}
_RLE = pa.struct([("size", pa.list_(pa.int32(), 2)), ("counts", pa.string())])

TRACK_SCHEMA = pa.schema(
    [
        ("video", pa.string()),
        ("prompt", pa.string()),
        ("frames", pa.int32()),
        ("frame_index", pa.int32()),
        ("object_id", pa.int64()),
        ("mask", _RLE),
        ("box", pa.list_(pa.float32(), 4)),
        ("score", pa.float32()),
        ("concept", pa.string()),
        ("error_code", pa.string()),
        ("error_message", pa.string()),
    ]
)
"""`frames`: frames tracked in the video; `mask` is COCO RLE of the frame's size (`pycocotools.mask.decode`),
`box` pixel xyxy, `concept` the text that found the object (concepts); the error columns are null on success."""


def video_prompt_spec(value: str) -> dict[str, Any]:
    """A prompt: plain text is a concept; a JSON object gives `track()`'s prompt arguments."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidPromptError(f"a prompt must be text or a JSON object, got {value!r}")
    if not value.lstrip().startswith("{"):
        return {"text": value}
    try:
        spec = json.loads(value)
    except json.JSONDecodeError as error:
        raise InvalidPromptError(f"the prompt is not valid JSON: {error}") from error
    unknown = set(spec) - VIDEO_PROMPT_KEYS if isinstance(spec, dict) else {"(not an object)"}
    if unknown:
        raise InvalidPromptError(f"unknown prompt keys {sorted(unknown)}: use {sorted(VIDEO_PROMPT_KEYS)}")
    return spec


def canonical_video_prompt(value: str) -> str:
    try:
        return json.dumps(video_prompt_spec(value), sort_keys=True, separators=(",", ":"))
    except InvalidPromptError:
        return value


def video_rows(video: str, prompt: str, frames: Iterable[dict[str, Any]], total: int) -> list[dict[str, Any]]:
    """A tracked video's rows from `track()`-style frames whose masks are still RLE (`encoded_frame`)."""
    rows = []
    for frame in frames:
        objects = frame["objects"] or [None]
        for obj in objects:
            rows.append(
                {
                    "video": video,
                    "prompt": prompt,
                    "frames": total,
                    "frame_index": frame["frame_index"],
                    "object_id": None if obj is None else obj["object_id"],
                    "mask": None if obj is None else obj["mask"],
                    "box": None if obj is None else list(obj["box"]),
                    "score": None if obj is None else obj["score"],
                    "concept": None if obj is None else obj["prompt"],
                    "error_code": None,
                    "error_message": None,
                }
            )
    return rows


def error_row(video: str, prompt: str, error: Exception) -> dict[str, Any]:
    typed = error if isinstance(error, Sam3Error) else Sam3Error(f"{type(error).__name__}: {error}")
    return {"video": video, "prompt": prompt, "error_code": typed.code, "error_message": typed.message}


def to_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=TRACK_SCHEMA)


def complete_videos(table: pa.Table) -> set[tuple[str, str]]:
    """(video, prompt) pairs whose rows are all there: no error, and a row for each of its frames."""
    ok = table.filter(pc.is_null(table["error_code"]))
    if ok.num_rows == 0:
        return set()
    grouped = ok.group_by(["video", "prompt", "frames"]).aggregate([("frame_index", "count_distinct")])
    return {
        (video, prompt)
        for video, prompt, frames, seen in zip(
            grouped["video"].to_pylist(),
            grouped["prompt"].to_pylist(),
            grouped["frames"].to_pylist(),
            grouped["frame_index_count_distinct"].to_pylist(),
        )
        if frames is not None and seen == frames
    }
