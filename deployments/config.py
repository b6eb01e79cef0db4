"""Typed configuration: the application's `args` and the model pool's live `user_config`.

`serve_config.yaml` supplies both; the models refuse unknown fields so a typo fails at deploy time.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from client.errors import ModelNotFoundError
from sam3_serve_core.compilation import DEFAULT_REGIONS, RegionName


class VideoArgs(BaseModel):
    """Video sessions' bounds (`video:` in the application's `args`). Each has a typed error (README, "Video")."""

    model_config = ConfigDict(extra="forbid")

    max_upload_bytes: int = Field(
        500_000_000, ge=1, description="Larger video files are refused (413 request_too_large) as they arrive."
    )
    max_frames: int = Field(3_000, ge=1, description="Frames one session holds; more is 413 video_too_long.")
    max_frame_pixels: int = Field(
        3840 * 2160, ge=1, description="Larger frames are refused (413 image_too_large) before they are decoded."
    )
    sessions_per_replica: int = Field(
        8, ge=1, description="Sessions a model replica holds; a new one past it evicts the least recently used."
    )
    session_bytes_per_replica: int = Field(
        8_000_000_000,
        ge=1,
        description="Bytes of sessions (their frames at the model's resolution, on the host, and the tracking "
        "state, on the model's device) a model replica holds; past it the least recently used are evicted, and "
        "one session alone over it is 413 video_too_long. The full model's frames take 6-12 MB each.",
    )
    idle_timeout_s: float = Field(
        600.0, gt=0, description="A session unused this long is ended (404 session_not_found afterwards)."
    )


class AppArgs(BaseModel):
    """The `args:` of the application in `serve_config.yaml`, validated by `build_app`."""

    model_config = ConfigDict(extra="forbid")

    models: dict[str, str] = Field(
        default_factory=lambda: {"sam3": "facebook/sam3"},
        min_length=1,
        description="Model ids a request may name (`model_id`), each a Hugging Face hub name (the local cache "
        "first) or a checkpoint directory.",
    )
    default_model: str = Field("sam3", description="The model id of requests that name none.")
    max_models_per_replica: int = Field(
        2, ge=1, description="Checkpoints a model replica holds at once; past it the least recently used is unloaded."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when the replica has a GPU.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Model weights and activations. auto: bfloat16 on a GPU (about 3x float32's speed there, within "
        "the bound the README states), float32 on a CPU (where bit-for-bit parity with transformers is checked).",
    )
    compile: bool | Literal["auto"] = Field(
        "auto",
        description="torch.compile the model's repeated transformer layers (the ViT's, the detector's encoder and "
        "decoder) into fused kernels. auto: on a GPU (about 1.4x the batched throughput of the full model on an "
        "H100; a replica compiles before it is ready, about 25 s more at start), not on a CPU. Answers move "
        "within rounding of the uncompiled model's.",
    )
    compile_regions: tuple[RegionName, ...] = Field(
        DEFAULT_REGIONS,
        min_length=1,
        description="With compile: the stacks of layers compiled, of vision (the ViT), detr_encoder and "
        "detr_decoder. The detector's stacks see the prompt, so they add warm-up passes for box prompts (about "
        "25 s more at a replica's start on an H100) and, measured there, no throughput.",
    )
    score_threshold: float = Field(
        0.5, gt=0.0, lt=1.0, description="Concept instances kept above it, unless a request sets its own."
    )
    mask_chunk_pixels: int = Field(
        16_000_000,
        ge=1,
        description="Full-size mask pixels made at once, on the model's device in the model replica and again when "
        "the postprocessor encodes them: bounds the memory of finishing masks (about 6 bytes each).",
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="Threads torch uses in a model replica. None: Ray's default, the CPUs the replica reserves.",
    )
    text_cache_size: int = Field(1024, ge=0, description="Text encodings a model replica keeps across requests.")
    vision_cache_bytes: int = Field(
        4_000_000_000,
        ge=0,
        description="Per model replica and checkpoint: bytes of images' vision features kept for follow-up prompts "
        "(on the model's device, so GPU memory on a GPU); least recently used evicted. 0 turns the cache off.",
    )
    max_image_pixels: int = Field(50_000_000, ge=1, description="Larger images are refused before decoding.")
    max_prompt_items: int = Field(
        64, ge=1, description="Most points or boxes in one prompt, and most texts or box sets in one request."
    )
    max_body_bytes: int = Field(
        100_000_000, ge=1, description="Larger request bodies are refused (base64 makes images 4/3 larger)."
    )
    api_key_env: str | None = Field(
        "SAM3_API_KEY",
        description="Environment variable holding one API key, read once at start. The key itself never goes in "
        "this file.",
    )
    api_key_file: str | None = Field(
        None,
        description="A file of API keys, one a line (a mounted secret), re-read as it changes so that keys rotate "
        "without a restart. It wins over api_key_env.",
    )
    api_key_refresh_s: float = Field(
        5.0,
        gt=0.0,
        description="How often the ingress re-reads api_key_file: a key removed from it is refused by every request "
        "that arrives this long after the change.",
    )
    video: VideoArgs = Field(default_factory=VideoArgs, description="Video sessions' bounds.")
    retry_after_s: int = Field(1, ge=0, description="Retry-After sent with 503 answers.")
    unavailable_after_s: float = Field(
        30.0,
        ge=0.0,
        description="Once a stage has had no running replica this long (a lost node, a replica that cannot start), "
        "the ingress answers 503 at once instead of letting requests wait out their timeout.",
    )

    @model_validator(mode="after")
    def _default_model_is_served(self) -> AppArgs:
        if self.default_model not in self.models:
            raise ValueError(f"default_model {self.default_model!r} is not one of models: {sorted(self.models)}")
        return self

    @property
    def checkpoint(self) -> str:
        """The default model's checkpoint: what single-model users (the jobs' in-process engine) load."""
        return self.models[self.default_model]

    def model_id_for(self, requested: str | None) -> str:
        """The model id that answers a request; an id the service does not serve is a typed 404."""
        if requested is None:
            return self.default_model
        if requested not in self.models:
            raise ModelNotFoundError(f"no model {requested!r}: this service serves {sorted(self.models)}")
        return requested


class BatchConfig(BaseModel):
    """The model pool's `user_config`: applied at start and on every `serve deploy`, without a restart."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(
        0.0, ge=0.0, description="How long the oldest queued request may wait for company while the model is idle."
    )
    max_concurrent_batches: int = Field(
        1, ge=1, description="Batches in flight at once: 2 on a GPU overlaps one batch's host work with another's."
    )


def set_default_checkpoint(args: dict, checkpoint: str) -> None:
    """Point the default model id of an application's `args` at `checkpoint` (a directory or hub name)."""
    default_model = args.get("default_model", AppArgs.model_fields["default_model"].default)
    args["models"] = {**args.get("models", {}), default_model: checkpoint}
