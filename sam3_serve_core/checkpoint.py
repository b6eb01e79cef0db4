"""Load a SAM 3 checkpoint, by hub name or directory, as one shared ViT with two heads.

`facebook/sam3` holds a concept detector (`Sam3Model`: text and box exemplars) and a SAM 2 style
tracker (`Sam3TrackerModel`: points) that share one ViT backbone. Both load from the same checkpoint;
the tracker's copy of the ViT is then replaced by the detector's, so the 446M-parameter backbone is held
once and its features are computed once per image for either head.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    Sam3Model,
    Sam3TrackerModel,
)
from transformers.utils import CONFIG_NAME

from client.errors import Sam3Error
from sam3_serve_core.checkpoint_marker import is_tiny_checkpoint
from sam3_serve_core.compilation import DEFAULT_REGIONS, compile_layers

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# facebook/sam3 is `sam3_video` (detector, tracker and video parts); an image-only save is `sam3`.
SAM3_MODEL_TYPES = ("sam3", "sam3_video")


class CheckpointUnavailableError(Sam3Error):
    """The checkpoint can be neither found on disk nor fetched from the model hub."""

    code = "checkpoint_unavailable"


@dataclass(frozen=True)
class ModelGeometry:
    """The sizes the pre- and post-processing need, read from the checkpoint, never hard-coded."""

    image_size: int
    mask_size: int
    text_max_tokens: int


@dataclass
class Sam3Models:
    detector: Sam3Model
    tracker: Sam3TrackerModel
    tokenizer: PreTrainedTokenizerBase
    geometry: ModelGeometry
    device: torch.device
    dtype: torch.dtype
    # The stacks of layers that compile on their first passes (`compilation.compile_layers`); empty: none.
    compiled_regions: tuple[str, ...] = ()

    @property
    def compiled(self) -> bool:
        return bool(self.compiled_regions)


def geometry_of(config: PretrainedConfig) -> ModelGeometry:
    """Sizes from a `Sam3Config`, or from the detector part of a `Sam3VideoConfig` (the real layout)."""
    detector_config = getattr(config, "detector_config", None) or config
    vision = detector_config.vision_config
    grid = vision.image_size // vision.backbone_config.patch_size
    return ModelGeometry(
        image_size=vision.image_size,
        mask_size=int(grid * max(vision.scale_factors)),
        text_max_tokens=detector_config.text_config.max_position_embeddings,
    )


def load_geometry(checkpoint: str) -> ModelGeometry:
    """The checkpoint's sizes from its config alone, for CPU stages that never load the weights."""
    return geometry_of(from_pretrained(AutoConfig, checkpoint))


def load_tokenizer(checkpoint: str) -> PreTrainedTokenizerBase:
    """The checkpoint's CLIP tokenizer (the CPU preprocessor needs only this, not the weights)."""
    return from_pretrained(AutoTokenizer, checkpoint)


def resolve_device(device: str) -> str:
    """`auto`: CUDA when this process has a GPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """`auto`: bfloat16 on a GPU, where it runs about 3x float32; float32 elsewhere (CPUs without bf16 units)."""
    if dtype == "auto":
        return "bfloat16" if torch.device(device).type == "cuda" else "float32"
    return dtype


def resolve_compile(compile: bool | str, device: str) -> bool:
    """`auto`: compile on a GPU, where fused kernels pay for the start they add; not on a CPU, where Inductor
    needs a C++ compiler and the start costs more than it saves."""
    if compile == "auto":
        return torch.device(device).type == "cuda"
    return bool(compile)


def load_sam3(
    checkpoint: str,
    device: str = "cpu",
    dtype: str = "float32",
    compile: bool | str = False,
    compile_regions: tuple[str, ...] = DEFAULT_REGIONS,
) -> Sam3Models:
    """Load both heads from one checkpoint, share the ViT, move to `device`, and switch to eval mode; with
    `compile` (or `auto` on a GPU), mark the layers of `compile_regions` for `torch.compile`."""
    dtype = resolve_dtype(dtype, device)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} or auto, got {dtype!r}")
    torch_dtype = DTYPES[dtype]
    if is_tiny_checkpoint(checkpoint):
        logger.warning("%s is a tiny random-weight test checkpoint: its masks are meaningless", checkpoint)
    detector = from_pretrained(Sam3Model, checkpoint, dtype=torch_dtype)
    tracker = from_pretrained(Sam3TrackerModel, checkpoint, dtype=torch_dtype)
    tracker.vision_encoder.backbone = detector.vision_encoder.backbone
    target = torch.device(device)
    detector.to(target).eval()
    tracker.to(target).eval()
    compiled_regions = tuple(compile_regions) if resolve_compile(compile, device) else ()
    if compiled_regions:
        compile_layers(detector, compiled_regions)
    return Sam3Models(
        detector=detector,
        tracker=tracker,
        tokenizer=load_tokenizer(checkpoint),
        geometry=geometry_of(detector.config),
        device=target,
        dtype=torch_dtype,
        compiled_regions=compiled_regions,
    )


def from_pretrained(cls, checkpoint: str, **kwargs):
    """`cls.from_pretrained`, with an error that says what to do when the directory or hub name fails."""
    if Path(checkpoint).is_dir():
        _check_sam3_directory(checkpoint)
        try:
            return cls.from_pretrained(checkpoint, **kwargs)
        except OSError as error:
            raise CheckpointUnavailableError(f"checkpoint directory {checkpoint!r} is incomplete: {error}") from error
    if Path(checkpoint).exists() or checkpoint.startswith((".", "/", "~")):
        raise CheckpointUnavailableError(f"checkpoint directory {checkpoint!r} does not exist")
    # A hub name: from_pretrained uses the local Hugging Face cache first, then the hub.
    logger.info("loading %s %s from the Hugging Face cache or hub", cls.__name__, checkpoint)
    try:
        return cls.from_pretrained(checkpoint, **kwargs)
    except OSError as error:
        raise CheckpointUnavailableError(
            f"could not load {checkpoint!r} from the Hugging Face hub or its local cache ({error}). "
            "If this machine cannot reach the hub, download the checkpoint elsewhere (it is gated: accept "
            "its license first) and set `checkpoint` to the local directory instead of the hub name."
        ) from error


def _check_sam3_directory(checkpoint: str) -> None:
    """Refuse a directory that is not a SAM 3 checkpoint before a model class half-loads it with warnings."""
    advice = "point `checkpoint` at a directory holding facebook/sam3's files (config.json, model.safetensors, tokenizer)"
    if not (Path(checkpoint) / CONFIG_NAME).is_file():
        raise CheckpointUnavailableError(f"{checkpoint!r} is not a SAM 3 checkpoint: it has no {CONFIG_NAME}; {advice}")
    config, _ = PretrainedConfig.get_config_dict(checkpoint)
    model_type = config.get("model_type")
    if model_type not in SAM3_MODEL_TYPES:
        raise CheckpointUnavailableError(
            f"{checkpoint!r} is not a SAM 3 checkpoint: its config.json says model_type {model_type!r}, not one of "
            f"{', '.join(SAM3_MODEL_TYPES)}; {advice}"
        )
