"""Segment a directory, glob or table of images from a Ray job, into Parquet files of masks.

    ray job submit --working-dir . -- python -m pipelines.segment \\
        --input /data/photos --output /data/masks --text "solar panel" --via service

`--via service` sends the rows to the live Serve application (a job and online traffic share its model
pool); `--via actors` runs the model in the job's own actor pool (GPU actors where the cluster has GPUs).
The job streams: rows are read, segmented and written as they go, so memory does not grow with the input.
It never stops for one bad row: that row is written with its error code. Re-running with the same output
skips the rows already done and redoes the failed ones. A lost node costs only time: worker actors are
restarted where their resources are offered and their cut-short batches run again, and requests to the
service retry 503s and lost replicas within `--timeout-s`; the summary line counts what was done again.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import yaml
from pydantic import BaseModel, ValidationError
from pydantic_settings import CliApp, CliSettingsSource
from ray.actor import ActorHandle
from ray.data import ActorPoolStrategy, Dataset
from ray.data.datasource import FilenameProvider

from deployments.config import AppArgs, set_default_checkpoint
from pipelines.coco import categories_path, write_coco_results
from pipelines.config import JobConfig, is_table
from pipelines.engines import PipelineSegmenter, ServiceSegmenter
from pipelines.output import output_filesystem, prepare_output, summarize
from pipelines.rows import canonical_prompt, row_keys
from pipelines.tally import start_tally

logger = logging.getLogger("pipelines.segment")
C = TypeVar("C", bound=BaseModel)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".npy")
LISTING_ROWS_PER_FILE = 10_000


def run_job(config: JobConfig) -> str:
    """Run the job to the end and return its summary line."""
    if not ray.is_initialized():
        ray.init()  # inside `ray job submit`, this joins the job's cluster
    run_id = datetime.now(timezone.utc).strftime("run-%Y%m%dT%H%M%S-") + uuid.uuid4().hex[:6]
    done = prepare_output(config.output)
    with tempfile.TemporaryDirectory(prefix="sam3-job-") as workdir:
        return _run(config, run_id, done, input_rows(config, Path(workdir)))


def _run(config: JobConfig, run_id: str, done: np.ndarray, rows: Dataset) -> str:
    if len(done):
        rows = rows.map_batches(drop_done, batch_format="pyarrow", fn_kwargs={"done": [ray.put(done)]})
    rows = rows.repartition(target_num_rows_per_block=config.rows_per_call)
    started = time.monotonic()
    tally = start_tally()
    segmented = segment_stage(rows, config, tally)
    segmented.write_parquet(
        config.output,
        filename_provider=FilenameProvider(dataset_uuid=run_id, file_format="parquet"),
        min_rows_per_file=config.rows_per_file,
        max_rows_per_file=config.rows_per_file,
    )
    elapsed = time.monotonic() - started
    this_run, everything = summarize(config.output, prefix=run_id), summarize(config.output)
    counts = ray.get(tally.read.remote())
    errors = ", ".join(f"{code} {count}" for code, count in sorted(this_run.errors.items())) or "none"
    line = (
        f"{run_id}: {this_run.rows} rows in {elapsed:.1f} s ({this_run.rows / elapsed:.1f} images/s), "
        f"{this_run.succeeded} ok, errors: {errors}; retried {counts['requests_retried']} requests, "
        f"restarted {counts['workers_restarted']} workers, redid {counts['rows_started'] - this_run.rows} rows; "
        f"skipped {len(done)} rows done before; {config.output} holds {everything.rows} rows"
    )
    if config.coco_json is not None:
        count = write_coco_results(config.output, config.coco_json)
        line += f"; {count} COCO results in {config.coco_json} (categories: {categories_path(config.coco_json)})"
    return line


def input_rows(config: JobConfig, workdir: Path) -> Dataset:
    """(image, prompt) rows: the image as listed (a path or URL) and the prompt in canonical JSON.

    A directory or glob is listed into Parquet files in `workdir` a chunk at a time, and read back on this
    node (`local://`), so the driver never holds the whole listing: its memory stays flat at any size.
    """
    if is_table(config.input):
        return _table_rows(config)
    prompt = canonical_prompt(config.text if config.text is not None else config.prompt)
    files = 0
    for files, chunk in enumerate(_chunks(list_images(config.input), LISTING_ROWS_PER_FILE), start=1):
        pq.write_table(pa.table({"image": chunk, "prompt": [prompt] * len(chunk)}), workdir / f"listing-{files:06}.parquet")
    if not files:
        raise SystemExit(f"no images in {config.input} (looked for {', '.join(IMAGE_SUFFIXES)})")
    return ray.data.read_parquet(f"local://{workdir}")


def list_images(input_path: str, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> Iterator[str]:
    """A glob's files, or a directory's files with one of `suffixes` (recursively), as the file system lists
    them: local directories one at a time, in name order within each; a URI's listing comes from pyarrow whole."""
    if any(char in input_path for char in "*?["):
        yield from (path for path in glob.iglob(input_path, recursive=True) if Path(path).is_file())
        return
    if "://" not in input_path:
        if not Path(input_path).is_dir():
            raise SystemExit(f"--input {input_path} is not a directory, a glob or a .parquet/.csv table")
        for directory, subdirectories, names in os.walk(input_path):
            subdirectories.sort()
            yield from (os.path.join(directory, name) for name in sorted(names) if name.lower().endswith(suffixes))
        return
    filesystem, root = output_filesystem(input_path)
    scheme = input_path.split("://", 1)[0] + "://"
    if filesystem.get_file_info(root).type != pafs.FileType.Directory:
        raise SystemExit(f"--input {input_path} is not a directory, a glob or a .parquet/.csv table")
    infos = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
    yield from sorted(
        scheme + info.path for info in infos if info.is_file and info.base_name.lower().endswith(suffixes)
    )


def _chunks(items: Iterator[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _table_rows(config: JobConfig) -> Dataset:
    """A table's image column (relative paths are relative to the table's directory) and prompts."""
    columns = set(_table_schema(config.input).names)
    wanted = [config.image_column] + ([config.prompt_column] if config.prompt_column else [])
    missing = [column for column in wanted if column not in columns]
    if missing:
        raise SystemExit(f"{config.input} has no column {missing[0]!r} (it has {sorted(columns)})")
    reader = ray.data.read_parquet if config.input.lower().endswith(".parquet") else ray.data.read_csv
    return reader(config.input).map_batches(
        table_rows,
        batch_format="pyarrow",
        fn_kwargs={
            "image_column": config.image_column,
            "prompt_column": config.prompt_column,
            "prompt": config.text if config.text is not None else config.prompt,
            "root": str(Path(config.input).parent) if "://" not in config.input else "",
        },
    )


def _table_schema(path: str) -> pa.Schema:
    if path.lower().endswith(".parquet"):
        return pq.read_schema(path) if not Path(path).is_dir() else pq.ParquetDataset(path).schema
    with pacsv.open_csv(path) as reader:
        return reader.schema


def table_rows(batch: pa.Table, *, image_column: str, prompt_column: str | None, prompt: str | None, root: str) -> pa.Table:
    images = [_resolve(str(value) if value is not None else "", root) for value in batch[image_column].to_pylist()]
    cells = batch[prompt_column].to_pylist() if prompt_column else [prompt] * len(images)
    prompts = [canonical_prompt(cell if cell is not None else "") for cell in cells]
    return pa.table({"image": images, "prompt": prompts})


def _resolve(image: str, root: str) -> str:
    if not image or "://" in image or Path(image).is_absolute() or not root:
        return image
    return str(Path(root) / image)


def drop_done(batch: pa.Table, *, done: list) -> pa.Table:
    """Rows whose key is among the sorted `done` keys (from `prepare_output`) are skipped."""
    keys = row_keys(batch["image"].to_pylist(), batch["prompt"].to_pylist())
    done_keys: np.ndarray = ray.get(done[0])
    found = np.searchsorted(done_keys, keys).clip(max=max(len(done_keys) - 1, 0))
    return batch.filter(pa.array(done_keys[found] != keys))


def segment_stage(rows: Dataset, config: JobConfig, tally: ActorHandle | None) -> Dataset:
    """The rows through the engine's worker actors. A worker lost with its node is restarted wherever its
    resources are offered and the batches it was given run again: each row is still written once. That is
    Ray Data's default for actor pools (`max_restarts` and `max_task_retries` of -1; passing them is deprecated
    since Ray 2.60); `tests/cluster/test_job_lost_node.py` holds the job to it."""
    common = {"batch_size": config.rows_per_call, "batch_format": "pyarrow", "num_cpus": config.worker_cpus}
    if config.via == "service":
        check_application(config.app_name)
        return rows.map_batches(
            ServiceSegmenter,
            fn_constructor_kwargs={
                "app_name": config.app_name,
                "max_in_flight": config.max_in_flight,
                "timeout_s": config.timeout_s,
                "retries": config.request_retries,
                "options": config.request_options,
                "tally": tally,
            },
            compute=ActorPoolStrategy(size=config.workers),
            **common,
        )
    args = app_args(config)
    gpus = int(ray.cluster_resources().get("GPU", 0)) if args.device != "cpu" else 0
    return rows.map_batches(
        PipelineSegmenter,
        fn_constructor_kwargs={"args": args, "options": config.request_options, "tally": tally},
        compute=ActorPoolStrategy(min_size=1, max_size=min(config.workers, gpus) if gpus else config.workers),
        num_gpus=1 if gpus else 0,
        resources={config.model_resource: 1} if config.model_resource else {},
        **common,
    )


def app_args(config: JobConfig) -> AppArgs:
    """The application's `args` from the Serve config, so both engines use one checkpoint and one set of limits."""
    applications = yaml.safe_load(config.config.read_text())["applications"]
    matching = [application for application in applications if application["name"] == config.app_name]
    if not matching:
        raise SystemExit(f"{config.config} has no application {config.app_name!r}")
    args = dict(matching[0].get("args", {}))
    if config.checkpoint:
        set_default_checkpoint(args, config.checkpoint)
    if config.device:
        args["device"] = config.device
    return AppArgs(**args)


def check_application(app_name: str) -> None:
    from ray import serve

    status = serve.status().applications.get(app_name)
    if status is None or status.status != "RUNNING":
        state = "not deployed" if status is None else status.status
        raise SystemExit(f"--via service: the Serve application {app_name!r} is {state}; deploy it first (serve deploy)")


def parse_args(argv: list[str] | None = None) -> JobConfig:
    return parse_config(JobConfig, "python -m pipelines.segment", __doc__, argv)


def parse_config(model: type[C], prog: str, description: str, argv: list[str] | None) -> C:
    """A job's typed config from the command line: pydantic-settings makes one `--kebab-case` flag per field,
    with its type, default and description, and reads nothing else (no environment variables)."""
    source = CliSettingsSource(
        model,
        cli_kebab_case=True,
        cli_implicit_flags=True,  # a bool field is a flag: --polygons
        root_parser=argparse.ArgumentParser(
            prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
        ),
    )
    try:
        return CliApp.run(model, cli_args=sys.argv[1:] if argv is None else argv, cli_settings_source=source)
    except ValidationError as error:
        problems = [
            (f"--{str(item['loc'][0]).replace('_', '-')}: " if item["loc"] else "") + item["msg"].removeprefix("Value error, ")
            for item in error.errors()
        ]
        source.root_parser.error("; ".join(problems))


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = parse_args(argv)
    print(run_job(config), flush=True)


if __name__ == "__main__":
    main()
