"""A COCO results file from the job's output, for pycocotools (`COCO.loadRes`) and COCO-style evaluation.

Written as a stream from the Parquet files, one file at a time. Each instance of a text or box prompt is
one result: `image_id` is the image as the job listed it, `segmentation` its COCO RLE (or, when the job ran
with `--polygons`, its polygons: COCO's polygon form, one flat [x0, y0, x1, y1, ...] list a region, which has
no holes, so an instance with a hole keeps its exact RLE), `bbox` its box as
[x, y, width, height], `score` its score. `category_id` numbers the concepts (a text, or a set of box
exemplars) in the order they first appear; `<name>.categories.json` beside it maps ids to concepts.
Point prompts have no detection semantics (client-api.txt), so they give no results.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from pipelines.output import output_filesystem, parquet_files
from pipelines.rows import parse_prompt

_COLUMNS = ["image", "prompt", "scores", "boxes", "labels", "masks", "polygons", "error_code"]


def write_coco_results(output: str, results_path: Path) -> int:
    """Write the results list and its categories; returns the number of results."""
    filesystem, _ = output_filesystem(output)
    categories: dict[str, int] = {}
    count = 0
    with results_path.open("w") as results:
        results.write("[")
        for path in parquet_files(output):
            for row in pq.read_table(path, columns=_COLUMNS, filesystem=filesystem).to_pylist():
                if row["error_code"] is not None or not row["masks"]:
                    continue
                concepts = _concepts(row["prompt"])
                outlines = row["polygons"] or [None] * len(row["masks"])
                instances = zip(row["scores"], row["boxes"], row["labels"], row["masks"], outlines)
                for score, box, label, mask, regions in instances:
                    category = categories.setdefault(concepts[label], len(categories) + 1)
                    x0, y0, x1, y1 = box
                    result = {
                        "image_id": row["image"],
                        "category_id": category,
                        "segmentation": _segmentation(mask, regions),
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "score": score,
                    }
                    results.write(("," if count else "") + "\n" + json.dumps(result))
                    count += 1
        results.write("\n]\n")
    category_list = [{"id": id_, "name": name} for name, id_ in categories.items()]
    categories_path(results_path).write_text(json.dumps(category_list, indent=1) + "\n")
    return count


def _segmentation(mask: dict, regions: list[dict] | None) -> dict | list[list[int]]:
    """COCO polygons (each region's exterior, flattened) when the instance was outlined and has no hole and
    at least one region; else its RLE, which is exact."""
    if not regions or any(region["holes"] for region in regions):
        return {"size": mask["size"], "counts": mask["counts"]}
    return [[coordinate for vertex in region["exterior"] for coordinate in vertex] for region in regions]


def categories_path(results_path: Path) -> Path:
    return results_path.with_name(results_path.stem + ".categories.json")


def _concepts(prompt: str) -> list[str]:
    """The name of each concept a prompt asks for, indexed as the row's `labels` index them."""
    spec = parse_prompt(prompt)
    if "text" in spec:
        return [spec["text"]] if isinstance(spec["text"], str) else list(spec["text"])
    if "box_sets" in spec:
        return [json.dumps(box_set, sort_keys=True, separators=(",", ":")) for box_set in spec["box_sets"]]
    return [json.dumps({"boxes": spec["boxes"], "labels": spec["labels"]}, separators=(",", ":"))]
