"""The job's output directory: Parquet files of `OUTPUT_SCHEMA` rows, written as results come and resumable.

A run writes files named after its run id. Before a run, `prepare_output` makes the directory hold each
successful row once and nothing else: a file an interrupted run left unreadable is removed (its rows are
redone), failed rows are dropped (they are redone), and the keys of the rows that remain are what the run
skips. Files are handled one at a time, so memory is one file plus 8 bytes a row done. Local paths and any
filesystem pyarrow opens by URI (s3://, gs://, ...) work; two jobs must not write one output at once.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.rows import OUTPUT_SCHEMA, row_keys

logger = logging.getLogger(__name__)


def output_filesystem(output: str) -> tuple[pafs.FileSystem, str]:
    filesystem, path = pafs.FileSystem.from_uri(output) if "://" in output else (pafs.LocalFileSystem(), output)
    return filesystem, path.rstrip("/")


def parquet_files(output: str, prefix: str = "") -> Iterator[str]:
    """The output's Parquet files in name order (the run id prefixes each run's files)."""
    filesystem, root = output_filesystem(output)
    if filesystem.get_file_info(root).type == pafs.FileType.NotFound:
        return
    infos = filesystem.get_file_info(pafs.FileSelector(root, recursive=False))
    for info in sorted(infos, key=lambda info: info.base_name):
        if info.is_file and info.base_name.endswith(".parquet") and info.base_name.startswith(prefix):
            yield info.path


def prepare_output(output: str) -> np.ndarray:
    """Keep only successful rows in the output and return their keys (sorted int64, see `row_keys`)."""
    filesystem, root = output_filesystem(output)
    if filesystem.get_file_info(root).type == pafs.FileType.Directory:
        for info in filesystem.get_file_info(pafs.FileSelector(root)):
            if info.base_name.endswith(".parquet.tmp"):  # a replacement a crash cut short: the original stands
                filesystem.delete_file(info.path)
    done = []
    for path in parquet_files(output):
        try:
            table = pq.read_table(path, filesystem=filesystem)
        except (pa.ArrowInvalid, OSError) as error:
            logger.warning("removing %s, left unreadable by an interrupted run (its rows are redone): %s", path, error)
            filesystem.delete_file(path)
            continue
        succeeded = table.filter(pc.is_null(table["error_code"]))
        if succeeded.num_rows < table.num_rows:
            replace_file(filesystem, path, succeeded, OUTPUT_SCHEMA)
        done.append(row_keys(succeeded["image"].to_pylist(), succeeded["prompt"].to_pylist()))
    return np.unique(np.concatenate(done)) if done else np.zeros(0, dtype=np.int64)


def replace_file(filesystem: pafs.FileSystem, path: str, table: pa.Table, schema: pa.Schema) -> None:
    """Write the kept rows beside the file, then move them over it, so a crash leaves one or the other."""
    if table.num_rows == 0:
        filesystem.delete_file(path)
        return
    staging = path + ".tmp"
    pq.write_table(table.cast(schema), staging, filesystem=filesystem)
    filesystem.move(staging, path)


@dataclass
class OutputSummary:
    rows: int = 0
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def succeeded(self) -> int:
        return self.rows - sum(self.errors.values())


def summarize(output: str, prefix: str = "") -> OutputSummary:
    """Rows and errors by code in the output (or one run's files), reading only the error column."""
    filesystem, _ = output_filesystem(output)
    summary = OutputSummary()
    for path in parquet_files(output, prefix):
        codes = pq.read_table(path, columns=["error_code"], filesystem=filesystem)["error_code"]
        summary.rows += len(codes)
        summary.errors.update(code for code in codes.drop_null().to_pylist())
    return summary
