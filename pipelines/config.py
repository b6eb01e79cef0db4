"""The job's typed configuration, validated once from the command line (`pipelines.segment`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class JobBase(BaseModel):
    """What the image and the video job share: their output, one prompt source, and where the model runs.
    Each job names its own input and prompts."""

    model_config = ConfigDict(extra="forbid")

    input: str
    output: str = Field(description="The output directory of Parquet files (a local path or a pyarrow URI).")
    via: Literal["service", "actors"] = Field(
        description="service: the live Serve application through its handle; actors: the model in the job's actors."
    )
    text: str | None = None
    prompt: str | None = None
    prompt_column: str | None = Field(None, description="The table column holding each row's prompt.")
    app_name: str = Field("sam3", description="The Serve application (service) or the config's application (actors).")
    config: Path = Field(Path("serve_config.yaml"), description="Where --via actors reads the application's args.")
    checkpoint: str | None = Field(None, description="--via actors: the checkpoint instead of the config's default model's.")
    device: Literal["auto", "cpu", "cuda"] | None = Field(None, description="--via actors: overrides the config's device.")

    @model_validator(mode="after")
    def _one_prompt_source(self) -> JobBase:
        given = [name for name in ("text", "prompt", "prompt_column") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of --text, --prompt or --prompt-column, got {given or 'none'}")
        if self.prompt_column is not None and not is_table(self.input):
            raise ValueError("--prompt-column needs a .parquet or .csv table as --input")
        return self


class JobConfig(JobBase):
    input: str = Field(description="A directory or glob of images, or a .parquet/.csv table of image paths or URLs.")
    text: str | None = Field(None, description="One text prompt for every image.")
    prompt: str | None = Field(None, description="One prompt for every image, as JSON (text, points or boxes).")
    image_column: str = Field("image", description="The table column holding each row's image path or URL.")
    max_instances: int | None = Field(
        None,
        ge=1,
        description="Keep at most this many concept instances per row, the highest scoring (none: all above the threshold).",
    )
    polygons: bool = Field(
        False, description="Also outline each instance as polygons (a `polygons` column; --coco-json writes them)."
    )
    polygon_tolerance: float = Field(
        1.0, ge=0, le=100, description="With --polygons: how many pixels a simplified outline may stray."
    )
    coco_json: Path | None = Field(None, description="Also write a COCO results file here.")
    model_resource: str | None = Field(
        None,
        description="actors: each model actor also asks for one unit of this custom resource, so it runs only on "
        "nodes that offer it (ray start --resources)",
    )
    workers: int = Field(2, ge=1, description="service: caller actors; actors: most model actors (one per GPU).")
    max_in_flight: int = Field(8, ge=1, description="service: requests each caller keeps in flight.")
    batch_size: int | None = Field(
        None,
        ge=1,
        description="Rows per call of a worker: actors, one model batch (8); service, 8 x --max-in-flight, so the "
        "window of requests in flight stays full but for each call's last few",
    )
    worker_cpus: float = Field(
        1.0,
        ge=0,
        description="CPUs each worker actor asks for (model actors on CPU; 0: --model-resource alone places them).",
    )
    rows_per_file: int = Field(1000, ge=1, description="Rows per output Parquet file (bounds file size and lost work).")
    timeout_s: float = Field(300.0, gt=0, description="service: each request's budget, retries included.")
    retries: int | None = Field(
        None,
        ge=0,
        description="service: most retries of a row's 503s and lost replicas, with backoff of at most 10 s (none: "
        "--timeout-s alone bounds them, so a lost model node that is back within it costs only the wait)",
    )

    @property
    def request_options(self) -> dict:
        """What every row's request carries beside its prompt (the clients' `PromptOptions`)."""
        options = {"max_instances": self.max_instances} if self.max_instances is not None else {}
        if self.polygons:
            options.update(polygons=True, polygon_tolerance=self.polygon_tolerance)
        return options

    @property
    def rows_per_call(self) -> int:
        if self.batch_size is not None:
            return self.batch_size
        return 8 * self.max_in_flight if self.via == "service" else 8

    @property
    def request_retries(self) -> int:
        """--retries, or one per second of --timeout-s: at a mean of about 5 s apart, the timeout ends them first."""
        return self.retries if self.retries is not None else math.ceil(self.timeout_s)

    @model_validator(mode="after")
    def _model_resource_needs_actors(self) -> JobConfig:
        if self.model_resource is not None and self.via != "actors":
            raise ValueError("--model-resource places the job's model actors: it needs --via actors")
        return self


def is_table(input_path: str) -> bool:
    return input_path.lower().endswith((".parquet", ".csv"))
