"""The batch job's pure parts, without Ray: prompts and row keys, output rows, the resumable output
directory, the COCO results file, and listing the input (a directory, a glob, a table).

The model is replaced by a fake `answer` callable: what is tested here is which rows reach it, in what
order, and how each answer (or error) becomes an `OUTPUT_SCHEMA` row.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO
from ray.data import DataContext
from ray.data._internal.execution.operators.actor_pool_map_operator import ActorPoolMapOperator

from client.errors import (
    InvalidImageError,
    InvalidPromptError,
    PromptTooLongError,
    Sam3Error,
    ServiceUnavailableError,
)
from client.protocol import Polygon, SegmentRequest, SegmentResponse
from client.rle import encode_mask, encode_masks
from deployments.config import AppArgs
from pipelines import segment as segment_module
from pipelines.coco import categories_path, write_coco_results
from pipelines.engines import PipelineSegmenter, ServiceSegmenter
from pipelines.output import prepare_output, summarize
from pipelines.rows import OUTPUT_SCHEMA, build_request, canonical_prompt, parse_prompt, row_keys, segment_rows
from pipelines.segment import drop_done, list_images, table_rows
from pipelines.tally import Tally
from tests.conftest import random_image

HEIGHT, WIDTH = 12, 16
CAT = canonical_prompt("cat")
POINT = canonical_prompt({"points": [[3, 4]], "labels": [1]})


# ---- helpers ----------------------------------------------------------------------------------------


def write_png(path: Path, seed: int = 0, height: int = HEIGHT, width: int = WIDTH) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(random_image(height, width, seed)).save(path, format="PNG")
    return str(path)


def instance_masks(count: int, seed: int, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """(count, H, W) uint8 0/255 masks, each non-empty."""
    rng = np.random.default_rng(seed)
    masks = (rng.uniform(size=(count, height, width)) > 0.6).astype(np.uint8) * 255
    masks[:, 0, 0] = 255
    return masks


def response(prompt_type: str = "text", count: int = 2, seed: int = 0, labels: list[int] | None = None):
    """A response as the service would send it: instances sorted by score, union of their masks."""
    if prompt_type == "points":  # no instances: the object is the union alone
        masks, union = np.zeros((0, HEIGHT, WIDTH), np.uint8), instance_masks(1, seed)[0]
    else:
        masks = instance_masks(count, seed)
        union = masks.max(axis=0) if count else np.zeros((HEIGHT, WIDTH), np.uint8)
    rng = np.random.default_rng(seed)
    corners = np.sort(rng.uniform(0, WIDTH, size=(len(masks), 2, 2)), axis=1).reshape(len(masks), 4)
    return SegmentResponse(
        prompt_type=prompt_type,
        height=HEIGHT,
        width=WIDTH,
        union_mask=encode_mask(union),
        masks=encode_masks(masks) if len(masks) else [],
        boxes=[tuple(float(v) for v in box) for box in corners[:, [0, 2, 1, 3]]],
        scores=sorted((float(s) for s in rng.uniform(0.5, 1, size=len(masks))), reverse=True),
        labels=labels if labels is not None else [0] * len(masks),
    )


class FakeAnswer:
    """Records every call and answers from a list (or one response for every request)."""

    def __init__(self, answers=None):
        self.answers = answers
        self.calls: list[list[SegmentRequest]] = []

    def __call__(self, requests):
        self.calls.append(list(requests))
        if self.answers is None:
            return [response(request.prompt_type, seed=index) for index, request in enumerate(requests)]
        assert len(self.answers) == len(requests), "the fake was given other rows than the test expects"
        return list(self.answers)

    @property
    def requests(self) -> list[SegmentRequest]:
        return [request for call in self.calls for request in call]


def decode(cell: dict) -> np.ndarray:
    """An RLE cell of the output to a 0/255 mask."""
    return coco_mask.decode({"size": cell["size"], "counts": cell["counts"].encode()}) * np.uint8(255)


def table_of(images: list[str], prompts: list[str]) -> pa.Table:
    """Output rows as a run writes them: every buildable row answered."""
    return segment_rows(images, prompts, FakeAnswer(), timeout_s=None)


def decode_response_mask(answer: SegmentResponse, index: int) -> np.ndarray:
    mask = answer.masks[index]
    return coco_mask.decode({"size": list(mask.size), "counts": mask.counts.encode()}) * np.uint8(255)


# ---- 1. prompts ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cell, expected",
    [
        ("cat", {"text": "cat"}),
        ("a red car", {"text": "a red car"}),
        ('{"text": ["cat", "dog"]}', {"text": ["cat", "dog"]}),
        ('  {"points": [[10, 20], [30, 40]], "labels": [1, 0]}', {"points": [[10, 20], [30, 40]], "labels": [1, 0]}),
        ('{"boxes": [[1, 2, 30, 40]], "labels": [1]}', {"boxes": [[1, 2, 30, 40]], "labels": [1]}),
        (
            '{"box_sets": [{"boxes": [[1, 2, 3, 4]], "labels": [1]}, {"boxes": [[5, 6, 7, 8]], "labels": [0]}]}',
            {"box_sets": [{"boxes": [[1, 2, 3, 4]], "labels": [1]}, {"boxes": [[5, 6, 7, 8]], "labels": [0]}]},
        ),
        ({"points": [[1, 2]], "labels": [1]}, {"points": [[1, 2]], "labels": [1]}),
    ],
)
def test_parse_prompt_reads_text_and_json_objects(cell, expected):
    assert parse_prompt(cell) == expected


@pytest.mark.parametrize(
    "spellings",
    [
        ["cat", '{"text": "cat"}', '{ "text" :"cat" }', {"text": "cat"}],
        [
            '{"points": [[10, 20]], "labels": [1]}',
            '{"labels":[1],"points":[[10,20]]}',
            '\n{ "labels" : [ 1 ] ,\n  "points" : [ [ 10 , 20 ] ] }',
            {"labels": [1], "points": [[10, 20]]},
        ],
        [
            '{"box_sets": [{"boxes": [[1, 2, 3, 4]], "labels": [1]}]}',
            '{"box_sets":[{"labels":[1],"boxes":[[1,2,3,4]]}]}',
        ],
    ],
)
def test_one_prompt_spelled_differently_has_one_canonical_form(spellings):
    forms = {canonical_prompt(spelling) for spelling in spellings}
    assert len(forms) == 1
    (form,) = forms
    assert canonical_prompt(form) == form, "the canonical form is its own canonical form"
    assert " " not in form and parse_prompt(form) == parse_prompt(spellings[-1])


def test_different_prompts_have_different_canonical_forms():
    cells = [
        "cat",
        "dog",
        '{"text": ["cat", "dog"]}',
        '{"text": ["dog", "cat"]}',
        '{"points": [[10, 20]], "labels": [1]}',
        '{"points": [[10, 20]], "labels": [0]}',
        '{"boxes": [[10, 20, 30, 40]], "labels": [1]}',
    ]
    assert len({canonical_prompt(cell) for cell in cells}) == len(cells)


@pytest.mark.parametrize(
    "cell",
    [
        '{"txt": "cat"}',  # unknown key
        '{"text": "cat", "score_threshold": 0.3}',  # a request field, not a prompt key
        '{"text": "cat"',  # not valid JSON
        '{"points": [[1, 2]], "labels": [1],}',
        "",
        "   ",
        "\n",
    ],
)
def test_a_cell_that_is_not_a_prompt_is_refused_and_kept_as_given(cell):
    with pytest.raises(InvalidPromptError) as info:
        parse_prompt(cell)
    assert info.value.code == "invalid_prompt"
    assert canonical_prompt(cell) == cell


@pytest.mark.parametrize("cell", [None, 5, ["cat"]])
def test_a_cell_that_is_not_text_is_refused(cell):
    with pytest.raises(InvalidPromptError):
        parse_prompt(cell)


# ---- 2. row keys ---------------------------------------------------------------------------------------


def test_row_keys_are_deterministic_int64_one_per_row():
    images = ["/data/a.jpg", "/data/b.jpg", "https://example.com/c.png"]
    prompts = [CAT, CAT, POINT]
    keys = row_keys(images, prompts)
    assert keys.dtype == np.int64 and keys.shape == (3,)
    np.testing.assert_array_equal(keys, row_keys(list(images), list(prompts)))
    # A row's key does not depend on the batch it comes in.
    np.testing.assert_array_equal(keys[1:], row_keys(images[1:], prompts[1:]))
    assert len(set(keys.tolist())) == 3
    assert row_keys([], []).dtype == np.int64 and row_keys([], []).shape == (0,)


def test_row_keys_differ_when_the_image_or_the_prompt_differs():
    (base,) = row_keys(["/data/a.jpg"], [CAT])
    (other_image,) = row_keys(["/data/b.jpg"], [CAT])
    (other_prompt,) = row_keys(["/data/a.jpg"], [canonical_prompt("dog")])
    assert len({base, other_image, other_prompt}) == 3


@pytest.mark.parametrize(
    "first, second",
    [
        (("ab", "c"), ("a", "bc")),
        (("a\0b", "c"), ("a", "b\0c")),  # the separator inside a cell
        (("a", ""), ("", "a")),
        (("a\0", "b"), ("a", "\0b")),
    ],
)
def test_row_keys_do_not_confuse_where_the_image_ends(first, second):
    keys = row_keys([first[0], second[0]], [first[1], second[1]])
    assert keys[0] != keys[1]


# ---- 3. output rows ------------------------------------------------------------------------------------


def test_segment_rows_answers_buildable_rows_in_order_and_types_the_rest(tmp_path):
    good = write_png(tmp_path / "good.png", seed=1)
    other = write_png(tmp_path / "other.png", seed=2)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    rows = [
        (good, CAT),  # answered
        (str(tmp_path / "missing.png"), CAT),  # the client cannot read it
        (good, '{"text": "cat"'),  # not JSON
        (good, '{"points": [[1, 2], [3, 4]], "labels": [1]}'),  # one label for two points
        (str(empty), CAT),  # the client sends zero bytes: only the server can say they are no image
        (other, POINT),  # answered
        ("http://[::1", CAT),  # a URL httpx refuses
        (good, '{"txt": "cat"}'),  # unknown key
        (other, canonical_prompt("dog")),  # answered
        (good, canonical_prompt({"boxes": [[1, 2, 8, 9]], "labels": [1]})),  # answered
    ]
    answers = [
        response("text", seed=1),
        InvalidImageError("not an image file in a format Pillow can read"),
        response("points", seed=2),
        RuntimeError("boom"),
        PromptTooLongError("33 tokens, at most 32"),
    ]
    fake = FakeAnswer(answers)
    table = segment_rows([image for image, _ in rows], [prompt for _, prompt in rows], fake, timeout_s=30.0)

    assert len(fake.calls) == 1, "the buildable rows are answered together"
    sent = fake.requests
    assert [request.image for request in sent] == [
        Path(good).read_bytes(),
        b"",
        Path(other).read_bytes(),
        Path(other).read_bytes(),
        Path(good).read_bytes(),
    ]
    assert [request.prompt_type for request in sent] == ["text", "text", "points", "text", "boxes"]
    assert sent[3].text == "dog" and sent[2].points == [[3.0, 4.0]] and sent[2].labels == [1]
    assert all(request.timeout_s == 30.0 and request.return_detections for request in sent)

    assert table.schema.equals(OUTPUT_SCHEMA, check_metadata=True)
    assert table["image"].to_pylist() == [image for image, _ in rows]
    assert table["prompt"].to_pylist() == [prompt for _, prompt in rows]
    assert table["error_code"].to_pylist() == [
        None,
        "invalid_image",
        "invalid_prompt",
        "invalid_prompt",
        "invalid_image",
        None,
        "invalid_image",
        "invalid_prompt",
        "internal_error",
        "prompt_too_long",
    ]
    messages = table["error_message"].to_pylist()
    assert "missing.png" in messages[1]
    assert "labels" in messages[3]
    assert messages[6].startswith("could not fetch image http://[::1")
    assert messages[8] == "RuntimeError: boom"
    assert messages[9] == "33 tokens, at most 32"
    for index in (0, 5):
        assert messages[index] is None
    for row in table.to_pylist():
        if row["error_code"] is not None:
            assert row["prompt_type"] is None and row["union_mask"] is None and row["masks"] is None
    assert table["prompt_type"].to_pylist()[5] == "points"


@pytest.mark.parametrize(
    "error, code",
    [
        (ServiceUnavailableError("replica lost"), "unavailable"),
        (InvalidImageError("bad"), "invalid_image"),
        (Sam3Error("server bug"), "internal_error"),
        (ValueError("bug"), "internal_error"),
    ],
)
def test_an_answered_error_gives_its_row_its_code(tmp_path, error, code):
    image = write_png(tmp_path / "a.png")
    table = segment_rows([image, image], [CAT, POINT], FakeAnswer([error, response("points")]), timeout_s=None)
    assert table["error_code"].to_pylist() == [code, None]


def test_a_batch_whose_rows_all_fail_has_the_schema_and_never_calls_answer(tmp_path):
    def answer(requests):
        raise AssertionError("nothing to answer")

    images = [str(tmp_path / "missing.png"), write_png(tmp_path / "a.png"), ""]
    prompts = [CAT, "", CAT]
    table = segment_rows(images, prompts, answer, timeout_s=None)
    assert table.schema.equals(OUTPUT_SCHEMA, check_metadata=True)
    assert table["error_code"].to_pylist() == ["invalid_image", "invalid_prompt", "invalid_image"]
    empty = segment_rows([], [], answer, timeout_s=None)
    assert empty.num_rows == 0 and empty.schema.equals(OUTPUT_SCHEMA, check_metadata=True)


def test_a_response_becomes_its_columns(tmp_path):
    image = write_png(tmp_path / "a.png")
    text = response("text", count=3, seed=5, labels=[1, 0, 1])
    point = response("points", seed=6)
    prompt = canonical_prompt({"text": ["cat", "dog"]})
    table = segment_rows([image, image], [prompt, POINT], FakeAnswer([text, point]), timeout_s=None)
    row, point_row = table.to_pylist()

    assert row["prompt_type"] == "text" and (row["height"], row["width"]) == (HEIGHT, WIDTH)
    np.testing.assert_array_equal(row["scores"], np.float32(text.scores))
    np.testing.assert_array_equal(row["boxes"], np.float32(text.boxes))
    assert row["labels"] == [1, 0, 1]
    assert len(row["masks"]) == 3
    for cell, expected in zip(row["masks"], instance_masks(3, 5)):
        assert cell["size"] == [HEIGHT, WIDTH]
        np.testing.assert_array_equal(decode(cell), expected)
    np.testing.assert_array_equal(decode(row["union_mask"]), instance_masks(3, 5).max(axis=0))
    assert row["error_code"] is None and row["error_message"] is None

    assert point_row["prompt_type"] == "points"
    assert point_row["scores"] == point_row["boxes"] == point_row["labels"] == point_row["masks"] == []
    np.testing.assert_array_equal(decode(point_row["union_mask"]), instance_masks(1, 6)[0])


# ---- 4. the output directory ---------------------------------------------------------------------------


def output_dir(tmp_path: Path) -> tuple[Path, dict[str, pa.Table], list[tuple[str, str]]]:
    """An output directory as runs leave it; returns it, the tables written, and the successful rows."""
    images = [write_png(tmp_path / "images" / f"{index}.png", seed=index) for index in range(6)]
    missing = [str(tmp_path / "images" / f"missing{index}.png") for index in range(3)]
    out = tmp_path / "out"
    out.mkdir()
    tables = {
        "run-a_000000.parquet": table_of(images[:3], [CAT, CAT, POINT]),  # all ok
        "run-a_000001.parquet": table_of(  # two ok, two failed
            [images[3], missing[0], images[4], missing[1]], [CAT, CAT, POINT, POINT]
        ),
        "run-b_000000.parquet": table_of([missing[2], images[5]], [CAT, '{"txt": 1}']),  # all failed
        "run-b_000001.parquet": table_of([images[0]], [CAT]),  # the same row again
    }
    for name, table in tables.items():
        pq.write_table(table, out / name)
    succeeded = [
        (images[0], CAT),
        (images[1], CAT),
        (images[2], POINT),
        (images[3], CAT),
        (images[4], POINT),
        (images[0], CAT),
    ]
    return out, tables, succeeded


def test_prepare_output_keeps_each_successful_row_and_returns_their_keys(tmp_path):
    out, tables, succeeded = output_dir(tmp_path)
    good_file = (out / "run-a_000000.parquet").read_bytes()
    truncated = good_file[: len(good_file) // 2]
    (out / "run-c_000000.parquet").write_bytes(truncated)
    (out / "run-c_000001.parquet").write_bytes(b"not a parquet file at all")
    (out / "run-c_000002.parquet").write_bytes(b"")
    (out / "run-a_000001.parquet.tmp").write_bytes(good_file)  # a replacement cut short
    (out / "notes.txt").write_text("not ours")

    keys = prepare_output(str(out))

    assert sorted(path.name for path in out.iterdir()) == [
        "notes.txt",
        "run-a_000000.parquet",
        "run-a_000001.parquet",
        "run-b_000001.parquet",
    ]
    assert (out / "run-a_000000.parquet").read_bytes() == good_file, "a file with no failed row is left alone"
    rewritten = pq.read_table(out / "run-a_000001.parquet")
    assert rewritten.schema.equals(OUTPUT_SCHEMA)
    original = tables["run-a_000001.parquet"]
    assert rewritten.to_pylist() == [original.to_pylist()[0], original.to_pylist()[2]]

    assert keys.dtype == np.int64
    assert np.all(keys[1:] > keys[:-1]), "sorted and unique (compared, not subtracted: 64-bit keys overflow a difference)"
    expected = row_keys([image for image, _ in succeeded], [prompt for _, prompt in succeeded])
    np.testing.assert_array_equal(keys, np.unique(expected))
    assert len(keys) == 5

    before = {path.name: path.read_bytes() for path in out.iterdir()}
    np.testing.assert_array_equal(prepare_output(str(out)), keys)
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before, "a second look changes nothing"


def test_prepare_output_of_a_missing_directory_is_empty_and_creates_nothing(tmp_path):
    keys = prepare_output(str(tmp_path / "nothing-yet"))
    assert keys.dtype == np.int64 and keys.shape == (0,)
    assert not (tmp_path / "nothing-yet").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert prepare_output(str(empty)).shape == (0,)


def test_summarize_counts_rows_and_errors_by_code_for_all_runs_or_one(tmp_path):
    out, _, _ = output_dir(tmp_path)
    everything = summarize(str(out))
    assert everything.rows == 10
    assert everything.errors == Counter({"invalid_image": 3, "invalid_prompt": 1})
    assert everything.succeeded == 6
    run_b = summarize(str(out), prefix="run-b")
    assert (run_b.rows, run_b.succeeded) == (3, 1)
    assert run_b.errors == Counter({"invalid_image": 1, "invalid_prompt": 1})
    assert summarize(str(out), prefix="run-z").rows == 0
    assert summarize(str(tmp_path / "absent")).rows == 0


# ---- 5. the input --------------------------------------------------------------------------------------


def test_drop_done_skips_the_rows_whose_keys_are_done(monkeypatch):
    """Ray is needed only to fetch the keys (`ray.get`); it is replaced by the identity here."""
    monkeypatch.setattr(segment_module.ray, "get", lambda ref: ref)
    images = [f"/data/{index}.jpg" for index in range(6)]
    batch = pa.table({"image": images, "prompt": [CAT] * 6})
    keys = row_keys(images, [CAT] * 6)
    int64 = np.iinfo(np.int64)

    def kept(done_keys) -> list[str]:
        return drop_done(batch, done=[np.unique(np.asarray(done_keys, dtype=np.int64))])["image"].to_pylist()

    assert kept(keys[[1, 4]]) == [images[0], images[2], images[3], images[5]]
    assert kept(np.concatenate([keys[[1, 4]], [int64.min, int64.max, 12345]])) == [
        images[0],
        images[2],
        images[3],
        images[5],
    ]
    assert kept([int64.min]) == images, "keys above every done key are kept"
    assert kept([int64.max]) == images, "keys below every done key are kept"
    assert kept(keys) == []
    other_prompt = row_keys(images, [POINT] * 6)
    assert kept(other_prompt) == images, "the same image with another prompt is not done"


def test_list_images_recurses_one_directory_at_a_time_and_filters_by_suffix(tmp_path):
    for name in ["b.png", "a.JPG", "sub/c.jpeg", "sub/deeper/d.npy", "sub/deeper/f.png", "sub/e.webp", "z.tiff"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    for name in ["notes.txt", "a.png.bak", "sub/.hidden"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "folder.png").mkdir()  # a directory with an image's suffix

    listed = list(list_images(str(tmp_path)))
    # One directory at a time (its files, then its subdirectories), in name order within each.
    expected = ["a.JPG", "b.png", "z.tiff", "sub/c.jpeg", "sub/e.webp", "sub/deeper/d.npy", "sub/deeper/f.png"]
    assert listed == [str(tmp_path / name) for name in expected]

    assert list(list_images(str(tmp_path / "*.png"))) == [str(tmp_path / "b.png")]
    assert list(list_images(str(tmp_path / "**" / "*.p*"))) == sorted(
        str(tmp_path / name) for name in ["a.png.bak", "b.png", "sub/deeper/f.png"]
    ), "a glob takes every file it matches, whatever its suffix, and recurses with **"
    assert list(list_images(str(tmp_path / "folder.*"))) == [], "a glob lists files only"
    with pytest.raises(SystemExit):
        list(list_images(str(tmp_path / "absent")))
    with pytest.raises(SystemExit):
        list(list_images(str(tmp_path / "b.png")))


def test_table_rows_resolve_relative_images_and_canonicalize_prompts(tmp_path):
    batch = pa.table(
        {
            "path": ["a.png", "/abs/b.png", "https://example.com/c.png", None, "sub/d.png", "s3://bucket/e.png"],
            "ask": ["cat", '{"labels": [1], "points": [[1, 2]]}', None, "dog", '{"txt": 1}', " cat"],
        }
    )
    rows = table_rows(batch, image_column="path", prompt_column="ask", prompt=None, root="/data/tables")
    assert rows.column_names == ["image", "prompt"]
    assert rows["image"].to_pylist() == [
        "/data/tables/a.png",
        "/abs/b.png",
        "https://example.com/c.png",
        "",
        "/data/tables/sub/d.png",
        "s3://bucket/e.png",
    ]
    assert rows["prompt"].to_pylist() == [
        '{"text":"cat"}',
        '{"labels":[1],"points":[[1,2]]}',
        "",
        '{"text":"dog"}',
        '{"txt": 1}',
        '{"text":" cat"}',
    ]

    unrooted = table_rows(batch, image_column="path", prompt_column=None, prompt="cat", root="")
    assert unrooted["image"].to_pylist()[0] == "a.png"
    assert unrooted["prompt"].to_pylist() == ['{"text":"cat"}'] * 6

    # A table's image relative to the table's directory, read for real; a null prompt fails its row.
    image = write_png(tmp_path / "tables" / "a.png")
    local = table_rows(
        pa.table({"image": ["a.png", "a.png", None], "prompt": ["cat", None, "cat"]}),
        image_column="image",
        prompt_column="prompt",
        prompt=None,
        root=str(tmp_path / "tables"),
    )
    fake = FakeAnswer()
    table = segment_rows(local["image"].to_pylist(), local["prompt"].to_pylist(), fake, timeout_s=None)
    assert table["error_code"].to_pylist() == [None, "invalid_prompt", "invalid_image"]
    assert [request.image for request in fake.requests] == [Path(image).read_bytes()]


# ---- 6. COCO results -----------------------------------------------------------------------------------


def test_coco_results_load_in_pycocotools_with_masks_boxes_and_categories(tmp_path):
    image_a = write_png(tmp_path / "images" / "a.png", seed=1)
    image_b = write_png(tmp_path / "images" / "b.png", seed=2)
    cat_and_dog = canonical_prompt({"text": ["cat", "dog"]})
    two_texts = response("text", count=3, seed=11, labels=[1, 0, 1])
    dog_alone = response("text", count=1, seed=12)
    table = segment_rows(
        [image_a, image_b, str(tmp_path / "missing.png"), image_b, image_a],
        [cat_and_dog, POINT, CAT, canonical_prompt("dog"), canonical_prompt("nothing")],
        FakeAnswer([two_texts, response("points", seed=13), dog_alone, response("text", count=0)]),
        timeout_s=None,
    )
    out = tmp_path / "out"
    out.mkdir()
    pq.write_table(table.slice(0, 3), out / "run-a_000000.parquet")
    pq.write_table(table.slice(3), out / "run-a_000001.parquet")
    results_path = tmp_path / "results.json"

    assert write_coco_results(str(out), results_path) == 4

    categories = json.loads(categories_path(results_path).read_text())
    assert categories_path(results_path).name == "results.categories.json"
    assert categories == [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}], "numbered in order of appearance"
    ground_truth = COCO()
    ground_truth.dataset = {
        "images": [{"id": image, "height": HEIGHT, "width": WIDTH} for image in (image_a, image_b)],
        "annotations": [],
        "categories": categories,
    }
    ground_truth.createIndex()
    results = ground_truth.loadRes(str(results_path))

    expected = [
        (image_a, "dog", two_texts, 0),
        (image_a, "cat", two_texts, 1),
        (image_a, "dog", two_texts, 2),
        (image_b, "dog", dog_alone, 0),
    ]
    annotations = results.loadAnns(sorted(results.getAnnIds()))
    assert len(annotations) == len(expected)
    for annotation, (image, name, answer, index) in zip(annotations, expected):
        assert annotation["image_id"] == image
        assert results.loadCats(annotation["category_id"])[0]["name"] == name
        mask = coco_mask.decode(annotation["segmentation"])
        np.testing.assert_array_equal(mask * 255, decode_response_mask(answer, index))
        x0, y0, x1, y1 = np.float32(answer.boxes[index])
        np.testing.assert_allclose(annotation["bbox"], [x0, y0, x1 - x0, y1 - y0], rtol=0, atol=1e-5)
        assert annotation["score"] == pytest.approx(answer.scores[index], abs=1e-6)


def test_with_polygons_the_output_has_them_and_coco_results_use_them_unless_an_instance_has_a_hole(tmp_path):
    """The `polygons` column holds each instance's regions as the answer gave them; the COCO file writes a
    polygon segmentation (each region's exterior, flattened) for an instance without holes, and the exact RLE
    for one with a hole, which COCO's polygon form cannot draw."""
    image = write_png(tmp_path / "a.png")
    answer = response("text", count=2, seed=21)
    square = Polygon(exterior=[(1, 1), (6, 1), (6, 5), (1, 5)])
    ring = Polygon(exterior=[(0, 0), (9, 0), (9, 9), (0, 9)], holes=[[(3, 3), (3, 5), (5, 5)]])
    outlined = answer.model_copy(update={"polygons": [[square], [ring]], "union_polygons": [ring]})
    table = segment_rows([image, image], [CAT, CAT], FakeAnswer([outlined, answer]), timeout_s=None)
    first, plain = table["polygons"].to_pylist()
    assert first == [[square.model_dump(mode="json")], [ring.model_dump(mode="json")]] and plain is None
    out = tmp_path / "out"
    out.mkdir()
    pq.write_table(table.slice(0, 1), out / "run-a_000000.parquet")
    results_path = tmp_path / "coco.json"
    assert write_coco_results(str(out), results_path) == 2
    without_hole, with_hole = json.loads(results_path.read_text())
    assert without_hole["segmentation"] == [[1, 1, 6, 1, 6, 5, 1, 5]]
    assert with_hole["segmentation"] == {"size": [HEIGHT, WIDTH], "counts": answer.masks[1].counts}
    drawn = coco_mask.decode(coco_mask.frPyObjects(without_hole["segmentation"], HEIGHT, WIDTH)).max(axis=2)
    assert drawn[2:5, 2:6].all() and drawn.sum() < 6 * 7, "pycocotools draws the polygon where it is"


def test_coco_results_of_an_output_with_no_instances_is_an_empty_list(tmp_path):
    image = write_png(tmp_path / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    table = segment_rows([image], [POINT], FakeAnswer([response("points")]), timeout_s=None)
    pq.write_table(table, out / "run-a_000000.parquet")
    results_path = tmp_path / "coco.json"
    assert write_coco_results(str(out), results_path) == 0
    assert json.loads(results_path.read_text()) == []
    assert json.loads(categories_path(results_path).read_text()) == []



def test_storage_uris_are_read_through_pyarrow(tmp_path):
    path = write_png(tmp_path / "via-uri.png", seed=3)
    request = build_request(Path(path).as_uri(), CAT, timeout_s=None)
    assert request.image == Path(path).read_bytes()
    with pytest.raises(InvalidImageError, match="cannot read image"):
        build_request((tmp_path / "missing.png").as_uri(), CAT, timeout_s=None)


# ---- 7. the job's options ------------------------------------------------------------------------------

JOB_ARGS = ["--input", "/data/photos", "--output", "/data/masks", "--text", "cat"]


@pytest.mark.parametrize("via", ["service", "actors"])
def test_max_instances_is_an_option_of_the_job(via):
    assert segment_module.parse_args([*JOB_ARGS, "--via", via, "--max-instances", "3"]).max_instances == 3
    assert segment_module.parse_args([*JOB_ARGS, "--via", via]).max_instances is None


@pytest.mark.parametrize("value", ["0", "-1", "2.5", "many"])
def test_a_max_instances_below_1_or_not_an_integer_stops_the_job_before_it_starts(value, capsys):
    with pytest.raises(SystemExit):
        segment_module.parse_args([*JOB_ARGS, "--via", "service", "--max-instances", value])
    assert "error: --max-instances: " in capsys.readouterr().err


def test_every_request_of_a_batch_carries_the_jobs_options(tmp_path):
    image = write_png(tmp_path / "a.png")
    prompts = [CAT, POINT, canonical_prompt({"boxes": [[1, 2, 8, 9]], "labels": [1]})]
    fake = FakeAnswer()
    options = {"max_instances": 2, "polygons": True, "polygon_tolerance": 2.0}
    segment_rows([image] * 3, prompts, fake, timeout_s=None, options=options)
    asked = [(request.max_instances, request.outline_tolerance) for request in fake.requests]
    assert asked == [(2, 2.0)] * 3
    segment_rows([image], [CAT], fake, timeout_s=None)
    assert (fake.requests[-1].max_instances, fake.requests[-1].outline_tolerance) == (None, None)
    assert build_request(image, CAT, timeout_s=None, options={"max_instances": 5}).max_instances == 5


@pytest.mark.parametrize(
    ("flags", "options"),
    [
        ([], {}),
        (["--max-instances", "3"], {"max_instances": 3}),
        (["--polygons"], {"polygons": True, "polygon_tolerance": 1.0}),
        (["--polygons", "--polygon-tolerance", "0"], {"polygons": True, "polygon_tolerance": 0.0}),
    ],
)
def test_the_jobs_options_come_from_its_command_line(flags, options):
    assert segment_module.parse_args([*JOB_ARGS, "--via", "service", *flags]).request_options == options


class FakeDataset:
    """What `segment_stage` does with the rows: it records the one `map_batches` call."""

    def map_batches(self, fn, **kwargs):
        self.fn, self.kwargs = fn, kwargs
        return self


@pytest.mark.parametrize("via", ["service", "actors"])
def test_both_engines_are_given_the_jobs_options(monkeypatch, via):
    monkeypatch.setattr(segment_module, "check_application", lambda app_name: None)
    monkeypatch.setattr(segment_module, "app_args", lambda config: AppArgs(device="cpu"))
    config = segment_module.parse_args([*JOB_ARGS, "--via", via, "--max-instances", "4", "--polygons"])
    rows = FakeDataset()
    segment_module.segment_stage(rows, config, tally=None)
    assert rows.fn is (ServiceSegmenter if via == "service" else PipelineSegmenter)
    expected = {"max_instances": 4, "polygons": True, "polygon_tolerance": 1.0}
    assert rows.kwargs["fn_constructor_kwargs"]["options"] == expected


@pytest.mark.parametrize("via", ["service", "actors"])
def test_a_lost_worker_is_restarted_and_its_batches_run_again(monkeypatch, via):
    """The job's guarantee when a node is lost rests on Ray Data's defaults for an actor pool, which the stage
    leaves alone: every worker restarted, every batch retried. A Ray upgrade that changes them fails here."""
    monkeypatch.setattr(segment_module, "check_application", lambda app_name: None)
    monkeypatch.setattr(segment_module, "app_args", lambda config: AppArgs(device="cpu"))
    rows = FakeDataset()
    segment_module.segment_stage(rows, segment_module.parse_args([*JOB_ARGS, "--via", via]), tally="the tally")
    assert not {"max_restarts", "max_task_retries"} & set(rows.kwargs)
    defaults = ActorPoolMapOperator._apply_default_remote_args({}, DataContext.get_current())
    assert (defaults["max_restarts"], defaults["max_task_retries"]) == (-1, -1)
    assert rows.kwargs["fn_constructor_kwargs"]["tally"] == "the tally"


def test_model_resource_places_the_model_actors_and_needs_via_actors(monkeypatch, capsys):
    monkeypatch.setattr(segment_module, "app_args", lambda config: AppArgs(device="cpu"))
    args = [*JOB_ARGS, "--model-resource", "sam3_model", "--worker-cpus", "0"]
    rows = FakeDataset()
    segment_module.segment_stage(rows, segment_module.parse_args([*args, "--via", "actors"]), tally=None)
    assert (rows.kwargs["resources"], rows.kwargs["num_cpus"]) == ({"sam3_model": 1}, 0)
    segment_module.segment_stage(rows, segment_module.parse_args([*JOB_ARGS, "--via", "actors"]), tally=None)
    assert (rows.kwargs["resources"], rows.kwargs["num_cpus"]) == ({}, 1)
    with pytest.raises(SystemExit):
        segment_module.parse_args([*args, "--via", "service"])
    assert "--model-resource" in capsys.readouterr().err


def test_the_service_engine_retries_until_the_timeout_unless_told_how_often():
    config = segment_module.parse_args([*JOB_ARGS, "--via", "service", "--timeout-s", "120.5"])
    assert config.retries is None and config.request_retries == 121
    assert segment_module.parse_args([*JOB_ARGS, "--via", "service", "--retries", "3"]).request_retries == 3


def test_the_service_engine_reports_its_rows_and_retries_to_the_tally(monkeypatch, tmp_path):
    reported: list[dict[str, int]] = []
    monkeypatch.setattr("pipelines.engines.report", lambda tally, **counts: reported.append(counts))
    segmenter = ServiceSegmenter("sam3", max_in_flight=2, timeout_s=30.0, retries=3)
    fake = FakeAnswer()

    def segment_many(requests, concurrency):
        segmenter.client.on_retry(ServiceUnavailableError("busy"))
        return fake(requests)

    segmenter.client.segment_many = segment_many
    image = write_png(tmp_path / "a.png")
    segmenter(pa.table({"image": [image, image], "prompt": [CAT, POINT]}))
    segmenter(pa.table({"image": [image], "prompt": [CAT]}))
    assert reported == [
        {"rows_started": 2}, {"requests_retried": 1}, {"rows_started": 1}, {"requests_retried": 1}
    ]  # fmt: skip


def test_the_tally_adds_counts_by_name_and_reads_0_for_what_nobody_counted():
    tally = Tally()
    assert tally.read()["workers_restarted"] == 0
    tally.add({"rows_started": 8, "requests_retried": 2})
    tally.add({"rows_started": 8, "workers_restarted": 1})
    assert tally.read() == {"rows_started": 16, "requests_retried": 2, "workers_restarted": 1}


def test_the_service_engine_sends_max_instances_with_every_row(tmp_path):
    segmenter = ServiceSegmenter("sam3", max_in_flight=2, timeout_s=30.0, retries=0, options={"max_instances": 2})
    fake = FakeAnswer()
    segmenter.client = SimpleNamespace(segment_many=lambda requests, concurrency: fake(requests))
    image = write_png(tmp_path / "a.png")
    table = segmenter(pa.table({"image": [image, image], "prompt": [CAT, POINT]}))
    assert table["error_code"].to_pylist() == [None, None]
    assert [request.max_instances for request in fake.requests] == [2, 2]


def test_the_actors_engine_sends_max_instances_with_every_row(monkeypatch, tmp_path):
    """The actors engine's model is replaced by a fake pipeline whose `answer` records the requests."""
    fake = FakeAnswer()
    monkeypatch.setattr("sam3_serve_core.checkpoint.load_sam3", lambda *args: None)
    uncompiled = SimpleNamespace(compiled=False)
    monkeypatch.setattr(
        "sam3_serve_core.pipeline.Sam3Pipeline", lambda models, **limits: SimpleNamespace(answer=fake, models=uncompiled)
    )
    segmenter = PipelineSegmenter(AppArgs(device="cpu"), options={"max_instances": 3})
    image = write_png(tmp_path / "a.png")
    segmenter(pa.table({"image": [image], "prompt": [CAT]}))
    assert [request.max_instances for request in fake.requests] == [3]
