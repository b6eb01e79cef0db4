"""Track concepts or objects through a directory, glob or table of videos from a Ray job, into Parquet rows.

    ray job submit --working-dir . -- python -m pipelines.track \\
        --input /data/clips --output /data/tracks --text "forklift" --via service

One row per (video, frame, object) (`pipelines.video_rows.TRACK_SCHEMA`). `--via service` tracks through the
live Serve application, `--via actors` in the job's own actors (the models loaded once per actor). Each worker
tracks one video at a time; a video's rows are written once it is done. A video that fails (not a video, too
long, ...) is one row with its error code, and the job goes on. Re-running with the same output skips the
videos whose rows are all there and redoes the rest.
"""

from __future__ import annotations

import logging
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from pydantic import Field
from ray.data import ActorPoolStrategy
from ray.data.datasource import FilenameProvider

from pipelines.config import JobBase, is_table
from pipelines.output import output_filesystem, parquet_files, replace_file
from pipelines.segment import app_args, check_application, list_images, parse_config
from pipelines.trackers import ServiceTracker, SessionTracker
from pipelines.video_rows import TRACK_SCHEMA, canonical_video_prompt, complete_videos

logger = logging.getLogger("pipelines.track")

VIDEO_SUFFIXES = (".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".gif")


class TrackJobConfig(JobBase):
    input: str = Field(description="A directory or glob of videos, or a .parquet/.csv table of video paths.")
    text: str | None = Field(None, description="One concept to track in every video.")
    prompt: str | None = Field(
        None,
        description='One prompt for every video, as JSON: {"text": [...]}, or {"points": ..., "labels": ..., '
        '"frame": 0} or {"boxes": ...}, as track() takes them.',
    )
    video_column: str = Field("video", description="The table column holding each row's video path.")
    workers: int = Field(2, ge=1, description="Videos tracked at once (service: callers; actors: model actors).")
    worker_cpus: float = Field(1.0, ge=0, description="CPUs each worker actor asks for.")
    timeout_s: float = Field(300.0, gt=0, description="service: each session call's budget (a stream's wait per frame).")
    rows_per_file: int = Field(10_000, ge=1, description="Rows per output Parquet file, at most.")


def run_job(config: TrackJobConfig) -> str:
    """Run the job to the end and return its summary line."""
    if not ray.is_initialized():
        ray.init()
    run_id = datetime.now(timezone.utc).strftime("run-%Y%m%dT%H%M%S-") + uuid.uuid4().hex[:6]
    done = prepare_track_output(config.output)
    videos = [row for row in input_videos(config) if (row["video"], row["prompt"]) not in done]
    started = time.monotonic()
    if videos:
        rows = ray.data.from_arrow(pa.Table.from_pylist(videos)).repartition(len(videos))
        track_stage(rows, config).write_parquet(
            config.output,
            filename_provider=FilenameProvider(dataset_uuid=run_id, file_format="parquet"),
            max_rows_per_file=config.rows_per_file,
        )
    elapsed = time.monotonic() - started
    tracked, failed = summarize_videos(config.output, run_id)
    errors = ", ".join(f"{code} {count}" for code, count in sorted(failed.items())) or "none"
    return (
        f"{run_id}: {len(videos)} videos in {elapsed:.1f} s, {tracked} tracked, errors: {errors}; "
        f"skipped {len(done)} videos done before"
    )


def input_videos(config: TrackJobConfig) -> list[dict[str, str]]:
    """(video, prompt) rows: a directory's or glob's videos with the one prompt, or a table's rows."""
    if not is_table(config.input):
        prompt = canonical_video_prompt(config.text if config.text is not None else config.prompt)
        videos = list(list_images(config.input, VIDEO_SUFFIXES))
        if not videos:
            raise SystemExit(f"no videos in {config.input} (looked for {', '.join(VIDEO_SUFFIXES)})")
        return [{"video": video, "prompt": prompt} for video in videos]
    table = pq.read_table(config.input) if config.input.lower().endswith(".parquet") else pacsv.read_csv(config.input)
    wanted = [config.video_column] + ([config.prompt_column] if config.prompt_column else [])
    missing = [column for column in wanted if column not in table.column_names]
    if missing:
        raise SystemExit(f"{config.input} has no column {missing[0]!r} (it has {sorted(table.column_names)})")
    root = Path(config.input).parent if "://" not in config.input else None
    cells = table[config.prompt_column].to_pylist() if config.prompt_column else [config.text or config.prompt] * table.num_rows
    return [
        {"video": _resolve(str(video), root), "prompt": canonical_video_prompt(str(cell))}
        for video, cell in zip(table[config.video_column].to_pylist(), cells)
    ]


def _resolve(video: str, root: Path | None) -> str:
    if root is None or "://" in video or Path(video).is_absolute():
        return video
    return str(root / video)


def track_stage(rows: ray.data.Dataset, config: TrackJobConfig) -> ray.data.Dataset:
    """One video per call of a worker actor; a worker lost with its node is restarted, as for the image job."""
    common = {"batch_size": 1, "batch_format": "pyarrow", "num_cpus": config.worker_cpus}
    if config.via == "service":
        check_application(config.app_name)
        return rows.map_batches(
            ServiceTracker,
            fn_constructor_kwargs={"app_name": config.app_name, "timeout_s": config.timeout_s},
            compute=ActorPoolStrategy(size=config.workers),
            **common,
        )
    args = app_args(config)
    gpus = int(ray.cluster_resources().get("GPU", 0)) if args.device != "cpu" else 0
    return rows.map_batches(
        SessionTracker,
        fn_constructor_kwargs={"args": args},
        compute=ActorPoolStrategy(min_size=1, max_size=min(config.workers, gpus) if gpus else config.workers),
        num_gpus=1 if gpus else 0,
        **common,
    )


def prepare_track_output(output: str) -> set[tuple[str, str]]:
    """Keep only the rows of videos whose rows are all there, and return those videos (with their prompts).

    A file an interrupted run left unreadable is removed, and so are the rows of failed or cut-short videos:
    they are redone. Two passes over the files: the small columns that say which videos are complete, then
    each file rewritten without the others.
    """
    filesystem, root = output_filesystem(output)
    if filesystem.get_file_info(root).type == pafs.FileType.Directory:
        for info in filesystem.get_file_info(pafs.FileSelector(root)):
            if info.base_name.endswith(".parquet.tmp"):
                filesystem.delete_file(info.path)
    keys = ["video", "prompt", "frames", "frame_index", "error_code"]
    readable, parts = [], []
    for path in parquet_files(output):
        try:
            parts.append(pq.read_table(path, columns=keys, filesystem=filesystem))
            readable.append(path)
        except (pa.ArrowInvalid, OSError) as error:
            logger.warning("removing %s, left unreadable by an interrupted run (its videos are redone): %s", path, error)
            filesystem.delete_file(path)
    done = complete_videos(pa.concat_tables(parts)) if parts else set()
    for path in readable:
        table = pq.read_table(path, filesystem=filesystem)
        kept = pa.array([(video, prompt) in done for video, prompt in zip(table["video"].to_pylist(), table["prompt"].to_pylist())])
        if not pc.all(kept).as_py():
            replace_file(filesystem, path, table.filter(kept), TRACK_SCHEMA)
    return done


def summarize_videos(output: str, prefix: str) -> tuple[int, dict[str, int]]:
    """Videos tracked by the run, and its failed videos by error code."""
    filesystem, _ = output_filesystem(output)
    tracked: set[tuple[str, str]] = set()
    failed: dict[str, int] = {}
    for path in parquet_files(output, prefix):
        table = pq.read_table(path, columns=["video", "prompt", "error_code"], filesystem=filesystem)
        for video, prompt, code in zip(table["video"].to_pylist(), table["prompt"].to_pylist(), table["error_code"].to_pylist()):
            if code is None:
                tracked.add((video, prompt))
            else:
                failed[code] = failed.get(code, 0) + 1
    return len(tracked), failed


def parse_args(argv: list[str] | None = None) -> TrackJobConfig:
    return parse_config(TrackJobConfig, "python -m pipelines.track", __doc__, argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(run_job(parse_args(argv)), flush=True)


if __name__ == "__main__":
    main()
