"""The model path of the batch job (`--via actors`) without Ray: `Sam3Pipeline.answer` gives, for a batch of
wire requests, what `Sam3Pipeline.segment` gives for each alone, with a typed error in place of each bad
request; and `segment_rows` over it turns image files into output rows.

On the tiny checkpoint (random weights: only the agreement matters). `answer` runs its requests as one
batch, which runs other kernels than one item alone: each answer is held to `segment` alone within the
bounds that hold across batch compositions (`tests/answers.py`), not bit for bit.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client._api import segment_request
from client.errors import InvalidImageError, PromptTooLongError
from client.protocol import SegmentResponse
from client.rle import decode_mask
from pipelines.rows import OUTPUT_SCHEMA, canonical_prompt, segment_rows
from sam3_serve_core.checkpoint import load_sam3
from sam3_serve_core.pipeline import Sam3Pipeline
from tests.answers import Expected, assert_close_answer, expect
from tests.conftest import random_image

TOO_LONG = "cat " * 100  # far more tokens than the text encoder takes


@pytest.fixture(scope="module")
def pipeline(tiny112_dir) -> Sam3Pipeline:
    return Sam3Pipeline(load_sam3(str(tiny112_dir)), mask_chunk_pixels=20_000)


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


IMAGE_A = png(random_image(60, 80, seed=1))
IMAGE_B = png(random_image(90, 50, seed=2))

# (image, prompt as segment_request's keywords, what answer gives: None for a response, else its error).
CASES = [
    (IMAGE_A, {"text": "cat"}, None),
    (IMAGE_B, {"boxes": [[5, 10, 40, 70]], "labels": [1]}, None),
    (IMAGE_A, {"points": [[30, 20]], "labels": [1]}, None),
    (b"not an image", {"text": "cat"}, InvalidImageError),
    (IMAGE_B, {"text": TOO_LONG}, PromptTooLongError),
    (IMAGE_B, {"text": ["cat", "dog"]}, None),
    (IMAGE_A, {"points": [[10, 10], [60, 50]], "labels": [1, 0]}, None),
]


def assert_answers_alike(answer: SegmentResponse, expected: Expected, prompt_type: str) -> None:
    """A wire response agrees with the in-process segmentation of the same image and prompt alone."""
    assert answer.prompt_type == prompt_type
    assert (answer.height, answer.width) == expected.answer.union_mask.shape
    assert_close_answer(answer, expected)


def test_answer_equals_segment_for_each_request_with_typed_errors_in_place(pipeline):
    requests = [segment_request(image, **prompt) for image, prompt, _ in CASES]
    answers = pipeline.answer(requests)
    assert len(answers) == len(CASES)
    instances = 0
    for (image, prompt, error), request, answer in zip(CASES, requests, answers):
        if error is not None:
            assert type(answer) is error, f"{prompt}: {answer!r}"
            assert answer.code == error.code
            continue
        assert isinstance(answer, SegmentResponse), f"{prompt}: {answer!r}"
        assert_answers_alike(answer, expect(pipeline, image, **prompt), request.prompt_type)
        instances += len(answer.masks)
        if request.prompt_type == "points":
            assert answer.masks == [] and decode_mask(answer.union_mask).any()
    assert instances > 0, "the concept prompts found instances: masks, boxes and scores were compared"
    assert {label for answer in answers[5:6] for label in answer.labels} == {0, 1}, "both texts answered"


def test_answer_without_detections_gives_the_same_union_and_no_instances(pipeline):
    requests = [segment_request(image, **prompt) for image, prompt, error in CASES if error is None]
    union_only = pipeline.answer([request.model_copy(update={"return_detections": False}) for request in requests])
    for full, answer in zip(pipeline.answer(requests), union_only):
        assert isinstance(answer, SegmentResponse)
        assert answer.masks == [] and answer.boxes == [] and answer.scores == [] and answer.labels == []
        assert answer.union_mask == full.union_mask  # the same batch, the same computation: the same bits
        assert (answer.height, answer.width, answer.prompt_type) == (full.height, full.width, full.prompt_type)


def test_segment_rows_over_the_pipeline_writes_what_segment_gives(pipeline, tmp_path):
    """What `PipelineSegmenter` does in each actor, without Ray: image files in, output rows out."""
    files = {}
    for name, image in [("a.png", random_image(60, 80, seed=3)), ("b.jpg", random_image(40, 70, seed=4))]:
        Image.fromarray(image).save(tmp_path / name)
        files[name] = str(tmp_path / name)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    rows = [
        (files["a.png"], "cat", {"text": "cat"}),
        (files["b.jpg"], '{"labels": [1], "boxes": [[2, 3, 50, 30]]}', {"boxes": [[2, 3, 50, 30]], "labels": [1]}),
        (files["a.png"], '{"points": [[40, 30]], "labels": [1]}', {"points": [[40, 30]], "labels": [1]}),
        (str(tmp_path / "broken.png"), "cat", None),
        (str(tmp_path / "missing.png"), "cat", None),
        (files["b.jpg"], TOO_LONG, None),
        (files["b.jpg"], '{"text": ["dog", "cat"]}', {"text": ["dog", "cat"]}),
    ]
    prompts = [canonical_prompt(cell) for _, cell, _ in rows]
    table = segment_rows([image for image, _, _ in rows], prompts, pipeline.answer, timeout_s=None)

    assert table.schema.equals(OUTPUT_SCHEMA)
    codes = table["error_code"].to_pylist()
    assert codes == [None, None, None, "invalid_image", "invalid_image", "prompt_too_long", None]
    assert sum(len(masks or []) for masks in table["masks"].to_pylist()) > 0, "instances were compared"
    for (image, _, prompt), row in zip(rows, table.to_pylist()):
        if prompt is None:
            assert row["union_mask"] is None and row["error_message"]
            continue
        expected = expect(pipeline, Path(image), **prompt)
        assert (row["height"], row["width"]) == expected.answer.union_mask.shape
        assert_close_answer(row, expected)  # the rows ran as one batch
