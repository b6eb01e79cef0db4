"""The video job's rows and which videos are done, without Ray."""

from __future__ import annotations

import pyarrow as pa
import pytest

from client.errors import InvalidPromptError, InvalidVideoError
from pipelines.video_rows import (
    TRACK_SCHEMA,
    canonical_video_prompt,
    complete_videos,
    error_row,
    to_table,
    video_prompt_spec,
    video_rows,
)

MASK = {"size": [4, 6], "counts": "0"}


def frame(index: int, object_ids: list[int]) -> dict:
    return {
        "frame_index": index,
        "objects": [{"object_id": i, "mask": MASK, "box": (0, 0, 1, 1), "score": 0.5, "prompt": "cat"} for i in object_ids],
    }


def test_a_prompt_is_text_or_the_json_of_tracks_arguments():
    assert video_prompt_spec("a red car") == {"text": "a red car"}
    assert video_prompt_spec('{"points": [[1, 2]], "labels": [1], "frame": 3}')["frame"] == 3
    assert canonical_video_prompt('{"text": "cat",  "frame": 0}') == canonical_video_prompt('{"frame":0,"text":"cat"}')
    with pytest.raises(InvalidPromptError, match="unknown prompt keys"):
        video_prompt_spec('{"image": "x"}')
    with pytest.raises(InvalidPromptError, match="not valid JSON"):
        video_prompt_spec("{oops")


def test_every_frame_has_a_row_and_each_object_its_own():
    rows = video_rows("a.mp4", "p", [frame(0, [1, 2]), frame(1, []), frame(2, [2])], total=3)
    assert [(row["frame_index"], row["object_id"]) for row in rows] == [(0, 1), (0, 2), (1, None), (2, 2)]
    assert {row["frames"] for row in rows} == {3}
    table = to_table(rows)
    assert table.schema == TRACK_SCHEMA and table.num_rows == 4


def test_a_video_is_done_when_every_frame_is_there_and_nothing_failed():
    whole = video_rows("whole.mp4", "p", [frame(0, [1]), frame(1, []), frame(2, [1, 2])], total=3)
    cut_short = video_rows("cut.mp4", "p", [frame(0, [1]), frame(1, [1])], total=3)
    failed = [error_row("bad.mp4", "p", InvalidVideoError("not a video"))]
    other_prompt = video_rows("whole.mp4", "q", [frame(0, [1])], total=1)
    table = pa.concat_tables([to_table(whole), to_table(cut_short), to_table(failed), to_table(other_prompt)])
    assert complete_videos(table) == {("whole.mp4", "p"), ("whole.mp4", "q")}
    assert to_table(failed).to_pylist()[0]["error_code"] == "invalid_video"
    assert complete_videos(to_table(failed)) == set()
