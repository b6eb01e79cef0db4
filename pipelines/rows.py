"""Job rows, without Ray: a prompt per row, the request for a row, and the output row for an answer.

A row is identified by its image (path or URL, as listed) and its prompt, in a canonical JSON form, so
the same (image, prompt) is recognised across runs. Both engines build the request the same way (the
clients' own validation and image reading) and turn the answer into the same output row, so a row's
error code is the one the service gives for it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from client._api import PromptOptions, prompt_request, with_image
from client.errors import InvalidImageError, InvalidPromptError, Sam3Error
from client.protocol import Polygon, RleMask, SegmentRequest, SegmentResponse
from sam3_serve_core.failures import in_place, passing

PROMPT_KEYS = {"text", "points", "boxes", "labels", "box_sets"}

_RLE = pa.struct([("size", pa.list_(pa.int32(), 2)), ("counts", pa.string())])
_RING = pa.list_(pa.list_(pa.int32(), 2))
_POLYGON = pa.struct([("exterior", _RING), ("holes", pa.list_(_RING))])

OUTPUT_SCHEMA = pa.schema(
    [
        ("image", pa.string()),
        ("prompt", pa.string()),
        ("prompt_type", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("scores", pa.list_(pa.float32())),
        ("boxes", pa.list_(pa.list_(pa.float32(), 4))),
        ("labels", pa.list_(pa.int32())),
        ("masks", pa.list_(_RLE)),
        ("union_mask", _RLE),
        ("polygons", pa.list_(pa.list_(_POLYGON))),
        ("error_code", pa.string()),
        ("error_message", pa.string()),
    ]
)
"""One row per (image, prompt). Masks are COCO RLE (`pycocotools.mask.decode` reads them); boxes are pixel
xyxy; `labels` index the prompt's texts or box sets; `polygons` (with `--polygons`, else null) is each
instance's regions, an exterior ring and its holes of [x, y] pixels; the error columns are null on success."""

Answer = Callable[[list[SegmentRequest]], Sequence[SegmentResponse | Exception]]


def parse_prompt(value: str | dict) -> dict[str, Any]:
    """A prompt cell: plain text is a text prompt; a JSON object gives text, points or boxes with labels."""
    if isinstance(value, dict):
        spec = value
    elif not isinstance(value, str) or not value.strip():
        raise InvalidPromptError(f"a prompt must be text or a JSON object, got {value!r}")
    elif value.lstrip().startswith("{"):
        try:
            spec = json.loads(value)
        except json.JSONDecodeError as error:
            raise InvalidPromptError(f"the prompt is not valid JSON: {error}") from error
    else:
        spec = {"text": value}
    unknown = set(spec) - PROMPT_KEYS
    if unknown:
        raise InvalidPromptError(f"unknown prompt keys {sorted(unknown)}: use {sorted(PROMPT_KEYS)}")
    return spec


def canonical_prompt(value: str | dict) -> str:
    """The prompt as the output stores it: canonical JSON, or the cell as given when it is not a prompt."""
    try:
        return json.dumps(parse_prompt(value), sort_keys=True, separators=(",", ":"))
    except InvalidPromptError:
        return value if isinstance(value, str) else repr(value)


def row_keys(images: Sequence[str], prompts: Sequence[str]) -> np.ndarray:
    """A 64-bit hash of each (image, prompt): 8 bytes a row is all that resuming a job holds in memory.

    The image's length comes first, so no split of one string into image and prompt hashes like another
    (a separator alone would not do: a table's cells may contain it). Keys are never stored: each run
    computes them again from the rows the output holds."""
    return np.array([_row_key(image, prompt) for image, prompt in zip(images, prompts)], dtype=np.int64)


def _row_key(image: str, prompt: str) -> int:
    digest = hashlib.blake2b(f"{len(image)}:{image}\0{prompt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def build_request(
    image: str, prompt: str, *, timeout_s: float | None, options: PromptOptions | None = None
) -> SegmentRequest:
    """The request a client would send, with the job's `options` (max_instances, polygons): the same prompt
    checks and the same image reading (typed errors). Paths and http(s) URLs are read as the clients read
    them; other URIs (s3://, gs://, file://) by pyarrow."""
    request = prompt_request(**parse_prompt(prompt), timeout=timeout_s, return_detections=True, **(options or {}))
    return with_image(request, read_uri(image) if _is_storage_uri(image) else image, http=None)


def read_uri(uri: str) -> bytes:
    try:
        filesystem, path = pafs.FileSystem.from_uri(uri)
        with filesystem.open_input_stream(path) as stream:
            return stream.read()
    except (OSError, pa.ArrowException) as error:
        raise InvalidImageError(f"cannot read image {uri}: {error}") from error


def _is_storage_uri(image: str) -> bool:
    return "://" in image and not image.lower().startswith(("http://", "https://"))


def segment_rows(
    images: Sequence[str],
    prompts: Sequence[str],
    answer: Answer,
    *,
    timeout_s: float | None,
    options: PromptOptions | None = None,
) -> pa.Table:
    """Output rows for a batch of (image, prompt): requests that cannot be built fail alone, the rest are
    answered together (by the live service or an in-process pipeline). Every request carries the job's
    `options` (`JobConfig.request_options`)."""
    built: list[SegmentRequest | Exception] = []
    for image, prompt in zip(images, prompts):
        try:
            built.append(build_request(image, prompt, timeout_s=timeout_s, options=options))
        except Exception as error:  # a row fails alone, whatever fails: not only the clients' typed errors
            built.append(error)
    requests = passing(built)
    answers = in_place(built, answer(requests) if requests else [])
    rows = [output_row(image, prompt, response) for image, prompt, response in zip(images, prompts, answers)]
    return pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)


def output_row(image: str, prompt: str, answer: SegmentResponse | Exception) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(OUTPUT_SCHEMA.names)
    row.update(image=image, prompt=prompt)
    if isinstance(answer, Exception):
        code = answer.code if isinstance(answer, Sam3Error) else Sam3Error.code
        message = str(answer) if isinstance(answer, Sam3Error) else f"{type(answer).__name__}: {answer}"
        row.update(error_code=code, error_message=message)
        return row
    row.update(
        prompt_type=answer.prompt_type,
        height=answer.height,
        width=answer.width,
        scores=list(answer.scores),
        boxes=[list(box) for box in answer.boxes],
        labels=list(answer.labels),
        masks=[_rle_cell(mask) for mask in answer.masks],
        union_mask=_rle_cell(answer.union_mask),
        polygons=_polygons_cell(answer.polygons),
    )
    return row


def _polygons_cell(polygons: list[list[Polygon]] | None) -> list | None:
    return None if polygons is None else [[region.model_dump() for region in regions] for regions in polygons]


def _rle_cell(mask: RleMask) -> dict[str, Any]:
    return {"size": list(mask.size), "counts": mask.counts}
