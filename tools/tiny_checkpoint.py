"""Build a random-weight SAM 3 checkpoint in the exact `facebook/sam3` layout, at one of three sizes.

The real weights are gated and unreachable from CI, so tests and the offline demo load these through the
same loading code. THEIR MASKS ARE MEANINGLESS: the weights are random, only calibrated so that concept
scores straddle the 0.5 threshold and every code path (kept and dropped instances) runs.

    python -m tools.tiny_checkpoint OUT_DIR [--preset tiny|mid|full] [--size PX]

Presets: `tiny` (112 px, a ViT 32 wide and heads 128: tests and demos), `mid` (504 px, a 12-layer ViT that dominates
the cost: CPU benchmarks), `full` (1008 px, `facebook/sam3`'s own configuration, ~860M parameters,
3.4 GB: GPU benchmarks, where random weights cost the same compute as real ones).

The layout mirrors `facebook/sam3`: a `Sam3VideoConfig`, one `model.safetensors` whose keys sit under
`detector_model.`, `tracker_model.` and `tracker_neck.`, and the processor files with the real CLIP BPE
tokenizer (the merges shipped by the `open_clip_torch` package).
"""

from __future__ import annotations

import argparse
import copy
import gzip
import hashlib
import importlib.resources
import json
import time
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file
from transformers import (
    CLIPTokenizer,
    Sam2VideoVideoProcessor,
    Sam3ImageProcessor,
    Sam3VideoConfig,
    Sam3VideoModel,
    Sam3VideoProcessor,
)

from sam3_serve_core.checkpoint_marker import TINY_MARKER_FILE

PATCH_SIZE = 14
CLIP_VOCAB_SIZE = 49408
TEXT_MAX_TOKENS = 32
# Calibration. Concept heads: a presence logit near its clamp (10) makes the presence score ~1, and a
# larger query projection spreads the per-query logits, so scores straddle 0.5 with wide margins. At
# initialisation those logits have a spread of about 0.02**2 * width * gain: QUERY_PROJ_GAIN_X_WIDTH / width
# makes it ~5 at every width (the gain is 100 at the tiny preset's 128).
# Concept masks: a larger mask embedding moves the mask logits from ~1e-4 to ~1-10, away from the threshold;
# at initialisation the logits grow about as the width cubed (measured: 43x from 32 to 128), so the gain
# shrinks as that: 10000 at width 32, 156 at 128.
# Tracker head: distinct IoU biases so the best of the three multimask outputs is not a near-tie (and
# is not the first), and a larger mask projection so few mask logits sit near the 0 threshold.
PRESENCE_BIAS = 8.0
QUERY_PROJ_GAIN_X_WIDTH = 12800.0
CONCEPT_MASK_GAIN_X_WIDTH_CUBED = 10000.0 * 32**3
TRACKER_IOU_BIAS = (0.0, -1.0, 1.0, 0.0)
TRACKER_MASK_GAIN = 20000.0
# The tracker's object-score head: +10 says "the clicked object is there", so video tracking keeps every
# clicked object (at random initialisation it says "gone" and every video mask is empty).
TRACKER_OBJECT_SCORE_BIAS = 10.0
# transformers' video tracker reads 64 memory channels whatever the config says (`kv_in_dim=64`), and needs
# heads wider than that and a multiple of it: the tiny preset's heads are 128 wide, its ViT 32.
VIDEO_MEMORY_CHANNELS = 64


def _grid(image_size: int) -> int:
    if image_size <= 0 or image_size % PATCH_SIZE:
        raise ValueError(f"image size must be a positive multiple of {PATCH_SIZE}, got {image_size}")
    return image_size // PATCH_SIZE


def _set_image_size(config: Sam3VideoConfig, image_size: int) -> Sam3VideoConfig:
    """Resize every part: the ViT, both heads' feature sizes and the tracker's low-resolution masks."""
    grid = _grid(image_size)
    config.image_size = image_size
    config.detector_config.vision_config.backbone_feature_sizes = [[4 * grid] * 2, [2 * grid] * 2, [grid] * 2]
    config.low_res_mask_size = 4 * grid
    return config


def _scaled_config(image_size: int, vit: dict, width: int, heads: int, num_queries: int) -> Sam3VideoConfig:
    """The real structure with the ViT `vit` and every head, the FPN and the text encoder `width` wide."""
    vision = {
        "model_type": "sam3_vision_model",
        "backbone_config": {"model_type": "sam3_vit_model", "patch_size": PATCH_SIZE, **vit},
        "fpn_hidden_size": width,
    }
    block = {"hidden_size": width, "num_attention_heads": heads, "intermediate_size": 2 * width}
    detector = {
        "vision_config": copy.deepcopy(vision),
        "text_config": {
            "model_type": "clip_text_model",
            "vocab_size": CLIP_VOCAB_SIZE,
            "hidden_size": width,
            "intermediate_size": 2 * width,
            "projection_dim": width,
            "num_hidden_layers": 2,
            "num_attention_heads": heads,
            "max_position_embeddings": TEXT_MAX_TOKENS,
        },
        "geometry_encoder_config": {**block, "num_layers": 1},
        "detr_encoder_config": {**block, "num_layers": 1},
        "detr_decoder_config": {**block, "num_layers": 2, "num_queries": num_queries},
        "mask_decoder_config": {"hidden_size": width, "num_attention_heads": heads},
    }
    tracker = {
        "vision_config": copy.deepcopy(vision),
        "prompt_encoder_config": {"hidden_size": width},
        "mask_decoder_config": {
            "hidden_size": width,
            "mlp_dim": 2 * width,
            "num_attention_heads": heads,
            "iou_head_hidden_dim": width,
        },
        "memory_attention_hidden_size": width,
        "memory_attention_feed_forward_hidden_size": 2 * width,
        "memory_encoder_hidden_size": width,
        "memory_encoder_output_channels": VIDEO_MEMORY_CHANNELS,
        "mask_downsampler_embed_dim": width,
        "memory_fuser_embed_dim": width,
        "memory_fuser_intermediate_dim": 2 * width,
    }
    return _set_image_size(Sam3VideoConfig(detector_config=detector, tracker_config=tracker), image_size)


def tiny_config(image_size: int = 112) -> Sam3VideoConfig:
    """A ViT 32 wide, heads as narrow as the video tracker allows (128), one or two layers per stack: builds in a
    second, for tests and demos."""
    vit = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "window_size": max(1, _grid(image_size) // 2),
        "global_attn_indexes": [1],
        "pretrain_image_size": image_size,
    }
    return _scaled_config(image_size, vit, width=2 * VIDEO_MEMORY_CHANNELS, heads=2, num_queries=20)


def mid_config(image_size: int = 504) -> Sam3VideoConfig:
    """A 12-layer ViT that dominates the cost, windowed like the real one (3x3 windows, every sixth layer
    global as every eighth of the real 32); heads 128 wide."""
    window = max(1, _grid(image_size) // 3)
    vit = {
        "hidden_size": 384,
        "intermediate_size": 1536,
        "num_hidden_layers": 12,
        "num_attention_heads": 6,
        "window_size": window,
        "global_attn_indexes": [5, 11],
        "pretrain_image_size": window * PATCH_SIZE,
    }
    return _scaled_config(image_size, vit, width=2 * VIDEO_MEMORY_CHANNELS, heads=2, num_queries=50)


def full_config(image_size: int = 1008) -> Sam3VideoConfig:
    """`facebook/sam3`'s configuration: transformers' defaults are the real model's."""
    return _set_image_size(Sam3VideoConfig(), image_size)


# --preset name -> config function; its argument, the resolution, defaults to the preset's own.
PRESETS: dict[str, Callable[..., Sam3VideoConfig]] = {"tiny": tiny_config, "mid": mid_config, "full": full_config}


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The real CLIP BPE vocabulary (49408 tokens), rebuilt from open_clip's merges file.

    This is how OpenAI's CLIP derives its vocabulary, so token ids equal those of `facebook/sam3`.
    """
    merges_file = importlib.resources.files("open_clip") / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.decompress(merges_file.read_bytes()).decode("utf-8").split("\n")
    num_merges = CLIP_VOCAB_SIZE - 2 * 256 - 2  # byte symbols, their end-of-word forms, two specials
    merges = [tuple(line.split()) for line in lines[1 : 1 + num_merges]]
    from open_clip.tokenizer import bytes_to_unicode  # CLIP's reversible byte-to-character table

    symbols = list(bytes_to_unicode().values())
    symbols += [symbol + "</w>" for symbol in symbols]
    symbols += ["".join(merge) for merge in merges]
    symbols += ["<|startoftext|>", "<|endoftext|>"]
    return {symbol: index for index, symbol in enumerate(symbols)}, merges


def random_state_dict(config: Sam3VideoConfig, seed: int) -> dict[str, torch.Tensor]:
    """Seeded random weights with the real key layout, heads calibrated so scores straddle 0.5.

    These are the model's own tensors, calibrated in place: one copy of the weights is held.
    """
    torch.manual_seed(seed)
    state = Sam3VideoModel(config).state_dict()
    query_proj_gain = QUERY_PROJ_GAIN_X_WIDTH / config.detector_config.detr_decoder_config.hidden_size
    with torch.no_grad():
        state["detector_model.detr_decoder.presence_head.layer3.bias"].fill_(PRESENCE_BIAS)
        state["detector_model.dot_product_scoring.query_proj.weight"].mul_(query_proj_gain)
        mask_gain = CONCEPT_MASK_GAIN_X_WIDTH_CUBED / config.detector_config.mask_decoder_config.hidden_size**3
        state["detector_model.mask_decoder.mask_embedder.layers.2.weight"].mul_(mask_gain)
        state["detector_model.mask_decoder.mask_embedder.layers.2.bias"].mul_(mask_gain)
        state["tracker_model.mask_decoder.iou_prediction_head.proj_out.bias"].copy_(torch.tensor(TRACKER_IOU_BIAS))
        state["tracker_model.mask_decoder.pred_obj_score_head.proj_out.bias"].fill_(TRACKER_OBJECT_SCORE_BIAS)
        for key, tensor in state.items():
            if key.startswith("tracker_model.mask_decoder.output_hypernetworks_mlps.") and key.endswith("proj_out.weight"):
                tensor.mul_(TRACKER_MASK_GAIN)
    return {key: tensor.contiguous() for key, tensor in sorted(state.items())}


def build_tiny_checkpoint(
    out_dir: str | Path, image_size: int | None = None, seed: int = 0, preset: str = "tiny"
) -> Path:
    """Write config, weights and processor files to `out_dir` and return it.

    `image_size` defaults to the preset's own (112 for `tiny`).
    """
    config = PRESETS[preset]() if image_size is None else PRESETS[preset](image_size)
    image_size = config.image_size
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out_dir)
    # The pinned safetensors writes from the tensors' own memory: no second copy of the weights.
    save_file(random_state_dict(config, seed), out_dir / "model.safetensors", metadata={"format": "pt"})
    vocab, merges = clip_vocab_and_merges()
    grid = image_size // PATCH_SIZE
    image_processor = Sam3ImageProcessor(
        size={"height": image_size, "width": image_size},
        mask_size={"height": 4 * grid, "width": 4 * grid},
    )
    # The video processor's config holds the image processor's and the tokenizer's too: every SAM 3 processor
    # (image, tracker, video, tracker video) loads from it.
    processor = Sam3VideoProcessor(
        image_processor=image_processor,
        video_processor=Sam2VideoVideoProcessor(
            size=image_processor.size, image_mean=image_processor.image_mean, image_std=image_processor.image_std
        ),
        tokenizer=CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=TEXT_MAX_TOKENS),
    )
    processor.save_pretrained(out_dir)
    (out_dir / TINY_MARKER_FILE).write_text(
        f"Random-weight SAM 3 checkpoint ({preset} preset) built by tools.tiny_checkpoint.\n"
        "Its masks, boxes and scores are MEANINGLESS. It exists to test the real loading and serving code.\n"
        + json.dumps({"preset": preset, "image_size": image_size, "seed": seed}) + "\n"
    )
    return out_dir


def cached_checkpoint(cache_dir: str | Path, preset: str = "tiny", image_size: int | None = None) -> Path:
    """`build_tiny_checkpoint` once into `cache_dir`, in a folder named by the preset, the size and this file's
    hash: a changed builder never reuses an old build."""
    source_hash = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]
    name = preset if image_size is None else f"{preset}-{image_size}"
    out_dir = Path(cache_dir) / f"{name}-{source_hash}"
    if not (out_dir / "model.safetensors").exists():
        build_tiny_checkpoint(out_dir, image_size=image_size, preset=preset)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--preset", choices=PRESETS, default="tiny")
    parser.add_argument("--size", type=int, help=f"model resolution, a multiple of {PATCH_SIZE} (default: the preset's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()
    out_dir = build_tiny_checkpoint(args.out_dir, args.size, args.seed, args.preset)
    size_mb = sum(f.stat().st_size for f in out_dir.iterdir()) / 1e6
    image_size = json.loads((out_dir / "config.json").read_text())["tracker_config"]["image_size"]
    print(
        f"built {args.preset} SAM 3 checkpoint at {out_dir} ({size_mb:.1f} MB, {time.perf_counter() - started:.1f} s, "
        f"{image_size}x{image_size}). Its masks are meaningless: random weights, for tests and benchmarks only."
    )


if __name__ == "__main__":
    main()
