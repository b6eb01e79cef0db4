"""`python -m pipelines.segment` as a user runs it: `ray job submit` against a real local cluster.

The cluster is started here with `ray start --head` (and stopped after); the application is deployed with
`serve deploy` from serve_config.yaml's CPU profile on the tiny random-weight checkpoint (its masks are
meaningless: the test holds them against the in-process pipeline, not against reality). The inputs hold
corrupt, truncated and zero-byte files and a bad prompt row; every good row must agree with what the
in-process pipeline gives for its image alone, every bad row must carry its error code, and every row must
be there once. The rows run in batches (the service's, or an actor's `Sam3Pipeline.answer`), and the
service answers an image it has cached (sent by an earlier test here) from features encoded in another
batch: cached or not, a row is held to the bounds that hold across batch compositions (`tests/answers.py`),
not bit for bit.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections import Counter
from functools import lru_cache
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from pipelines.rows import canonical_prompt, parse_prompt
from sam3_serve_core.checkpoint import load_sam3
from sam3_serve_core.pipeline import Sam3Pipeline
from tests.answers import assert_close_answer, expect
from tests.conftest import random_image
from tests.ray_cluster import Cluster
from tools.launch import cpu_config

GOOD_IMAGES = 240
TEXT = "a red car"
BOX_PROMPT = json.dumps({"boxes": [[4, 4, 30, 28]], "labels": [1]})
POINT_PROMPT = json.dumps({"points": [[12, 10]], "labels": [1]})
BAD_PROMPT = json.dumps({"points": [[12, 10]], "labels": [1, 0]})  # two labels for one point


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny112_dir):
    cluster = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        config = cpu_config(str(tiny112_dir), cluster.http_port)
        config_path = tmp_path_factory.mktemp("serve") / "sam3-cpu.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        cluster.serve_deploy(config_path)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, str]:
    """Good images of varied sizes and the bad files, by path, with the error code each bad one must get."""
    root = tmp_path_factory.mktemp("images")
    expected: dict[str, str] = {}
    for index in range(GOOD_IMAGES):
        path = root / f"sub{index % 3}" / f"image{index:04}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(random_image(24 + index % 17, 32 + index % 13, seed=index)).save(path)
        expected[str(path)] = ""
    whole = (root / "sub0" / "image0000.png").read_bytes()
    for name, content in {"zero.png": b"", "truncated.png": whole[: len(whole) // 2], "corrupt.jpg": b"\xff\xd8" + b"x" * 300}.items():
        (root / name).write_bytes(content)
        expected[str(root / name)] = "invalid_image"
    return expected


@pytest.fixture(scope="module")
def table(images, tmp_path_factory) -> tuple[Path, dict[tuple[str, str], str]]:
    """A Parquet table of (image, prompt): text, box and point prompts, a bad prompt, a missing file."""
    rows: dict[tuple[str, str], str] = {}
    for index, (path, code) in enumerate(images.items()):
        prompt = (TEXT, BOX_PROMPT, POINT_PROMPT)[index % 3]
        rows[(path, prompt)] = code
    good = next(path for path, code in images.items() if not code)
    rows[(good, BAD_PROMPT)] = "invalid_prompt"
    rows[(str(Path(good).with_name("missing.png")), TEXT)] = "invalid_image"
    path = tmp_path_factory.mktemp("table") / "rows.parquet"
    pq.write_table(pa.table({"image": [image for image, _ in rows], "prompt": [prompt for _, prompt in rows]}), path)
    return path, rows


@lru_cache(maxsize=1)
def in_process(checkpoint: str) -> Sam3Pipeline:
    return Sam3Pipeline(load_sam3(checkpoint))


def output_rows(output: Path) -> list[dict]:
    return pads.dataset(output, format="parquet").to_table().to_pylist()


def assert_rows(rows: list[dict], expected: dict[tuple[str, str], str], checkpoint: str) -> None:
    """Every (image, prompt) once; bad rows with their code; good rows close to the in-process pipeline's."""
    keys = [(row["image"], row["prompt"]) for row in rows]
    canonical = {(image, canonical_prompt(prompt)): code for (image, prompt), code in expected.items()}
    assert len(keys) == len(set(keys)) == len(canonical), "every row exactly once"
    assert set(keys) == set(canonical)
    pipeline = in_process(checkpoint)
    instances = 0
    for row in rows:
        code = canonical[(row["image"], row["prompt"])]
        if code:
            assert row["error_code"] == code, row
            assert row["error_message"] and row["union_mask"] is None
            continue
        assert row["error_code"] is None, row
        expected = expect(pipeline, row["image"], **parse_prompt(row["prompt"]))
        assert (row["height"], row["width"]) == expected.answer.union_mask.shape
        try:
            assert_close_answer(row, expected)
        except AssertionError as error:
            raise AssertionError(f"row {row['image']} {row['prompt']}: {error}") from None
        instances += expected.at_threshold().instances
    assert instances > 0, "the good rows' expected answers have instances: masks, scores and boxes were compared"


def _readable_rows(path: Path) -> tuple[int, int]:
    """Rows, and successful rows, in a file the stopped job finished writing (one it was cut off in is not
    readable: the re-run removes it and redoes its rows)."""
    try:
        codes = pq.read_table(path, columns=["error_code"])["error_code"]
    except (pa.ArrowInvalid, OSError):
        return 0, 0
    return len(codes), codes.null_count


def first_traceback(log: str) -> str:
    """The lines of a job's log around the first traceback in it."""
    lines = log.splitlines()
    start = next(index for index, line in enumerate(lines) if "Traceback" in line)
    return "\n".join(lines[max(0, start - 3) : start + 40])


def summary_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stdout.splitlines() if line.startswith("run-")]
    assert lines, result.stdout[-3000:] + result.stderr[-3000:]
    return lines[-1]


def test_via_service_table_with_prompt_column(cluster, table, tiny112_dir, tmp_path):
    table_path, expected = table
    output = tmp_path / "out"
    result = cluster.submit("--via", "service", "--input", str(table_path), "--prompt-column", "prompt",
                            "--output", str(output), "--rows-per-file", "50", "--workers", "2")  # fmt: skip
    line = summary_line(result)
    assert f"{len(expected)} rows" in line and "invalid_image 4" in line and "invalid_prompt 1" in line, line
    # A bad row is expected traffic: the ingress logs it in one line, and no replica's traceback reaches the job.
    assert "Traceback" not in result.stdout + result.stderr, first_traceback(result.stdout + result.stderr)
    assert_rows(output_rows(output), expected, str(tiny112_dir))
    assert all(pq.read_metadata(path).num_rows <= 50 for path in output.glob("*.parquet"))


def test_via_actors_directory_with_coco_results(cluster, images, tiny112_dir, tmp_path):
    output, coco_json = tmp_path / "out", tmp_path / "results.json"
    result = cluster.submit("--via", "actors", "--input", str(Path(next(iter(images))).parents[1]), "--text", TEXT,
                            "--output", str(output), "--checkpoint", str(tiny112_dir), "--device", "cpu",
                            "--coco-json", str(coco_json), "--polygons")  # fmt: skip
    assert "invalid_image 3" in summary_line(result)
    rows = output_rows(output)
    assert_rows(rows, {(path, TEXT): code for path, code in images.items()}, str(tiny112_dir))
    results = json.loads(coco_json.read_text())
    assert len(results) == sum(len(row["masks"] or []) for row in rows) > 0
    assert {result["category_id"] for result in results} == {1}
    # --polygons: each answered row outlines each instance; COCO gets polygons where an instance has no hole.
    outlines = {row["image"]: row["polygons"] for row in rows if row["error_code"] is None}
    assert all(len(outlines[row["image"]]) == len(row["masks"]) for row in rows if row["error_code"] is None)
    written = Counter()
    for coco_result in results:  # an image's results in the order of its row's instances
        regions = outlines[coco_result["image_id"]][written[coco_result["image_id"]]]
        written[coco_result["image_id"]] += 1
        as_polygons = bool(regions) and not any(region["holes"] for region in regions)
        assert isinstance(coco_result["segmentation"], list) == as_polygons


def test_an_interrupted_job_finishes_on_the_rerun_with_every_row_once(cluster, images, tiny112_dir, tmp_path):
    """One request in flight, so the job takes long enough to be stopped when its first files are written."""
    output = tmp_path / "out"
    args = ["--via", "service", "--input", str(Path(next(iter(images))).parents[1]), "--text", TEXT, "--output",
            str(output), "--rows-per-file", "8", "--batch-size", "4", "--workers", "1", "--max-in-flight", "1"]  # fmt: skip
    job_id = f"interrupted-{uuid.uuid4().hex[:8]}"
    cluster.submit(*args, submission_id=job_id)
    deadline = time.monotonic() + 300
    while not list(output.glob("*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.2)
    cluster.ray("job", "stop", job_id)
    written = [_readable_rows(path) for path in output.glob("*.parquet")]
    partial, succeeded = sum(rows for rows, _ in written), sum(ok for _, ok in written)
    assert 0 < partial < len(images), f"the job should have been stopped halfway, it had written {partial} rows"
    line = summary_line(cluster.submit(*args))
    assert f"{len(images) - succeeded} rows in" in line and f"skipped {succeeded} rows done before" in line, line
    assert_rows(output_rows(output), {(path, TEXT): code for path, code in images.items()}, str(tiny112_dir))
