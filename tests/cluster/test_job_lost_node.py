"""The image job loses the node running its model halfway through, on two Ray nodes on one machine.

The head offers CPUs and no `sam3_model`; a worker node offers one `sam3_model` and no CPU, as in
`test_two_nodes.py`, so it runs the model and nothing else of the job. With `--via service` the model is
the Serve model pool's replica (the application as `test_two_nodes.py` deploys it), and the job's callers
run on the head. With `--via actors` no application is deployed: the job's own model actor asks for
`--model-resource sam3_model` and no CPU. Once a third of the job's rows are written, the worker node is
killed as a crash would (SIGKILL to all of its processes); once the cluster sees it gone, a new worker node
offering `sam3_model` joins.

The job itself finishes, with every row answered (that is what is asserted, not a re-run):
- `--via service`: each request retries 503s and lost replicas with backoff (at most 10 s apart) for as
  long as its `--timeout-s` (300 s) allows, and the model pool runs again on the new node well within it
  (with the 8 retries the job used to stop at, rows failed `unavailable` when this was tried);
- `--via actors`: Ray restarts the model actor on the new node and runs the batches it was given again.
A row whose budget ran out would be written `unavailable` and redone by a re-run (`tests/jobs` re-runs a
stopped job). Every (image, prompt) is in the output exactly once, without error; every mask decodes to
its image's shape; a sample of rows is held to the in-process pipeline within the bounds that hold across
batch compositions (`tests/answers.py`); and the summary line counts what was done again: the requests
retried (service), or the model actor restarted once (actors; whether it was cut short in a batch, whose
rows are then redone, or was between batches is chance).
"""

from __future__ import annotations

import json
import re
import signal
import uuid
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
from tests.answers import answer_of, assert_close_answer, expect
from tests.cluster.test_two_nodes import MODEL_RESOURCE, add_model_node, two_node_config
from tests.conftest import random_image
from tests.ray_cluster import Cluster, wait_for
from tools.launch import cpu_config

IMAGES = 80
PROMPTS = [
    "a red car",
    json.dumps({"boxes": [[4, 4, 40, 36]], "labels": [1]}),
    json.dumps({"points": [[20, 16]], "labels": [1]}),
]
ROWS = IMAGES * len(PROMPTS)
SAMPLE_EVERY = 6  # rows held to the in-process pipeline: every 6th (image, prompt), so each prompt type
JOB_TIMEOUT_S = 600  # generous: the job takes a minute or two on 2 cores, most of it the node's loss

pytestmark = pytest.mark.timeout(1200)


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> tuple[Path, dict[str, tuple[int, int]]]:
    """A Parquet table of (image, prompt), every image with every prompt, and each image's (height, width)."""
    root = tmp_path_factory.mktemp("lost-node-images")
    shapes: dict[str, tuple[int, int]] = {}
    for index in range(IMAGES):
        path = root / f"image{index:03}.png"
        height, width = 64 + index % 33, 64 + index * 7 % 33
        Image.fromarray(random_image(height, width, seed=index)).save(path)
        shapes[str(path)] = (height, width)
    rows = [(image, prompt) for image in shapes for prompt in PROMPTS]
    path = root / "rows.parquet"
    pq.write_table(pa.table({"image": [image for image, _ in rows], "prompt": [prompt for _, prompt in rows]}), path)
    return path, shapes


@pytest.fixture
def cluster(tmp_path):
    """A head with CPUs and a worker node offering the model resource only."""
    cluster = Cluster(tmp_path, num_cpus=4)
    try:
        add_model_node(cluster)
        yield cluster
    finally:
        cluster.stop()


def written_rows(output: Path) -> int:
    """Rows in the files the job has finished writing (a file it is still writing does not read yet)."""
    rows = 0
    for path in output.glob("*.parquet"):
        try:
            rows += pq.read_metadata(path).num_rows
        except (pa.ArrowInvalid, OSError):
            pass
    return rows


def run_losing_the_model_node(cluster: Cluster, output: Path, *job_args: str) -> str:
    """Submit the job, kill the worker node once a third of the rows are written, start a new worker node
    once the cluster sees the old one gone; return the finished job's summary line."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    jobs = JobSubmissionClient(cluster.address)
    job_id = f"lost-node-{uuid.uuid4().hex[:8]}"
    cluster.submit(*job_args, "--output", str(output), submission_id=job_id)

    def third_written() -> bool:
        status = jobs.get_job_status(job_id)
        assert not status.is_terminal(), (
            f"the job ended before the kill ({status}):\n{jobs.get_job_logs(job_id)[-6000:]}"
        )
        return written_rows(output) >= ROWS // 3

    wait_for(third_written, JOB_TIMEOUT_S, "a third of the rows to be written", interval_s=0.2)
    lost = cluster.workers[-1]
    lost.stop(signal.SIGKILL)
    written = written_rows(output)
    assert written < ROWS, "the job finished before its model node was killed"
    wait_for(lambda: lost.node_id not in {node["node_id"] for node in cluster.alive_nodes()}, 180, "the node's loss")
    add_model_node(cluster)
    wait_for(lambda: jobs.get_job_status(job_id).is_terminal(), JOB_TIMEOUT_S, "the job to end")
    logs = jobs.get_job_logs(job_id)
    assert jobs.get_job_status(job_id) == JobStatus.SUCCEEDED, logs[-6000:]
    (line,) = [line for line in logs.splitlines() if line.startswith("run-")]
    print(f"killed the model node with {written} of {ROWS} rows written; the job's summary: {line}")
    return line


def done_again(line: str) -> tuple[int, int, int]:
    """The requests retried, the workers restarted and the rows redone, as the summary line counts them."""
    found = re.search(r"retried (\d+) requests, restarted (\d+) workers, redid (\d+) rows", line)
    assert found, line
    return int(found[1]), int(found[2]), int(found[3])


def assert_every_row_once_and_whole(output: Path, shapes: dict[str, tuple[int, int]], checkpoint: str) -> None:
    rows = sorted(
        pads.dataset(output, format="parquet").to_table().to_pylist(), key=lambda r: (r["image"], r["prompt"])
    )
    keys = [(row["image"], row["prompt"]) for row in rows]
    expected = {(image, canonical_prompt(prompt)) for image in shapes for prompt in PROMPTS}
    assert len(keys) == len(set(keys)) == ROWS and set(keys) == expected, "every (image, prompt) exactly once"
    for row in rows:
        assert row["error_code"] is None, (row["image"], row["prompt"], row["error_code"], row["error_message"])
        answer = answer_of(row)  # decodes every mask
        masks = [answer.union_mask, *(answer.masks if answer.masks is not None else [])]
        assert {mask.shape for mask in masks} == {(row["height"], row["width"])} and row["height"] > 0
        assert (row["height"], row["width"]) == shapes[row["image"]]
    pipeline = Sam3Pipeline(load_sam3(checkpoint))
    for row in rows[::SAMPLE_EVERY]:
        try:
            assert_close_answer(row, expect(pipeline, row["image"], **parse_prompt(row["prompt"])))
        except AssertionError as error:
            raise AssertionError(f"row {row['image']} {row['prompt']}: {error}") from None


def test_via_service_a_lost_model_node_costs_the_job_only_retries(cluster, table, tiny112_dir, tmp_path):
    config_path = tmp_path / "sam3-two-nodes.yaml"
    config_path.write_text(yaml.safe_dump(two_node_config(str(tiny112_dir), cluster.http_port), sort_keys=False))
    cluster.serve_deploy(config_path)
    table_path, shapes = table
    output = tmp_path / "out"
    line = run_losing_the_model_node(cluster, output, "--via", "service", "--input", str(table_path),
                                     "--prompt-column", "prompt", "--workers", "1", "--max-in-flight", "8",
                                     "--batch-size", "8", "--rows-per-file", "8")  # fmt: skip
    assert f"{ROWS} rows in" in line and f"{ROWS} ok" in line, line
    requests_retried, workers_restarted, rows_redone = done_again(line)
    assert requests_retried > 0 and workers_restarted == rows_redone == 0, line  # the callers ran on the head
    assert_every_row_once_and_whole(output, shapes, str(tiny112_dir))


def test_via_actors_a_lost_model_node_costs_the_job_only_the_redone_batches(cluster, table, tiny112_dir, tmp_path):
    config_path = tmp_path / "sam3-cpu.yaml"
    config_path.write_text(yaml.safe_dump(cpu_config(str(tiny112_dir), cluster.http_port), sort_keys=False))
    table_path, shapes = table
    output = tmp_path / "out"
    line = run_losing_the_model_node(cluster, output, "--via", "actors", "--input", str(table_path),
                                     "--prompt-column", "prompt", "--config", str(config_path), "--device", "cpu",
                                     "--model-resource", MODEL_RESOURCE, "--worker-cpus", "0", "--workers", "1",
                                     "--batch-size", "4", "--rows-per-file", "8")  # fmt: skip
    assert f"{ROWS} rows in" in line and f"{ROWS} ok" in line, line
    requests_retried, workers_restarted, rows_redone = done_again(line)
    # The model actor was killed with its node and restarted once; whether a batch was cut short (rows redone)
    # or the actor was between batches (its queued batches simply wait for it) is chance.
    assert requests_retried == 0 and workers_restarted == 1 and rows_redone >= 0, line
    assert_every_row_once_and_whole(output, shapes, str(tiny112_dir))
