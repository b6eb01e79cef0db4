"""Build a tiny, random-weight SAM 3 checkpoint in the exact `facebook/sam3` layout.

The real weights are gated and unreachable from CI, so tests and the offline demo load this one
through the same loading code. ITS MASKS ARE MEANINGLESS: the weights are random, only calibrated so
that concept scores straddle the 0.5 threshold and every code path (kept and dropped instances) runs.

    python -m deployments.core.tiny_checkpoint OUT_DIR --size 112

The layout mirrors `facebook/sam3`: a `Sam3VideoConfig`, one `model.safetensors` whose keys sit under
`detector_model.`, `tracker_model.` and `tracker_neck.`, and the processor files with the real CLIP BPE
tokenizer (the merges shipped by the `open_clip_torch` package).
"""

from __future__ import annotations

import argparse
import copy
import gzip
import importlib.resources
import json
import time
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import (
    CLIPTokenizer,
    Sam3ImageProcessor,
    Sam3Processor,
    Sam3VideoConfig,
    Sam3VideoModel,
)

PATCH_SIZE = 14
HIDDEN_SIZE = 32
NUM_QUERIES = 20
CLIP_VOCAB_SIZE = 49408
TEXT_MAX_TOKENS = 32
# Calibration. Concept heads: a presence logit near its clamp (10) makes the presence score ~1, and a
# larger query projection spreads the per-query logits, so scores straddle 0.5 with wide margins.
# Concept masks: a larger mask embedding moves the mask logits from ~1e-4 to ~1, away from the threshold.
# Tracker head: distinct IoU biases so the best of the three multimask outputs is not a near-tie (and
# is not the first), and a larger mask projection so few mask logits sit near the 0 threshold.
PRESENCE_BIAS = 8.0
QUERY_PROJ_GAIN = 400.0
CONCEPT_MASK_GAIN = 10000.0
TRACKER_IOU_BIAS = (0.0, -1.0, 1.0, 0.0)
TRACKER_MASK_GAIN = 20000.0
# Its presence marks a tiny checkpoint, so that whatever loads one can say its masks are meaningless.
TINY_MARKER_FILE = "TINY_CHECKPOINT_README.txt"


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte-to-character table (from OpenAI's `simple_tokenizer.py`)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The real CLIP BPE vocabulary (49408 tokens), rebuilt from open_clip's merges file.

    This is how OpenAI's CLIP derives its vocabulary, so token ids equal those of `facebook/sam3`.
    """
    merges_file = importlib.resources.files("open_clip") / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.decompress(merges_file.read_bytes()).decode("utf-8").split("\n")
    num_merges = CLIP_VOCAB_SIZE - 2 * 256 - 2  # byte symbols, their end-of-word forms, two specials
    merges = [tuple(line.split()) for line in lines[1 : 1 + num_merges]]
    symbols = list(_bytes_to_unicode().values())
    symbols += [symbol + "</w>" for symbol in symbols]
    symbols += ["".join(merge) for merge in merges]
    symbols += ["<|startoftext|>", "<|endoftext|>"]
    return {symbol: index for index, symbol in enumerate(symbols)}, merges


def tiny_config(image_size: int) -> Sam3VideoConfig:
    """A `Sam3VideoConfig` with every width set to 32 and one or two layers per stack."""
    if image_size <= 0 or image_size % PATCH_SIZE:
        raise ValueError(f"image size must be a positive multiple of {PATCH_SIZE}, got {image_size}")
    grid = image_size // PATCH_SIZE
    vit = {
        "model_type": "sam3_vit_model",
        "hidden_size": HIDDEN_SIZE,
        "intermediate_size": 2 * HIDDEN_SIZE,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "patch_size": PATCH_SIZE,
        "window_size": max(1, grid // 2),
        "global_attn_indexes": [1],
        "pretrain_image_size": image_size,
    }
    vision = {
        "model_type": "sam3_vision_model",
        "backbone_config": vit,
        "fpn_hidden_size": HIDDEN_SIZE,
        "backbone_feature_sizes": [[4 * grid] * 2, [2 * grid] * 2, [grid] * 2],
    }
    block = {"hidden_size": HIDDEN_SIZE, "num_attention_heads": 2, "intermediate_size": 2 * HIDDEN_SIZE}
    detector = {
        "vision_config": copy.deepcopy(vision),
        "text_config": {
            "model_type": "clip_text_model",
            "vocab_size": CLIP_VOCAB_SIZE,
            "hidden_size": HIDDEN_SIZE,
            "intermediate_size": 2 * HIDDEN_SIZE,
            "projection_dim": HIDDEN_SIZE,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": TEXT_MAX_TOKENS,
        },
        "geometry_encoder_config": {**block, "num_layers": 1},
        "detr_encoder_config": {**block, "num_layers": 1},
        "detr_decoder_config": {**block, "num_layers": 2, "num_queries": NUM_QUERIES},
        "mask_decoder_config": {"hidden_size": HIDDEN_SIZE, "num_attention_heads": 2},
    }
    tracker = {
        "vision_config": copy.deepcopy(vision),
        "prompt_encoder_config": {"hidden_size": HIDDEN_SIZE},
        "mask_decoder_config": {
            "hidden_size": HIDDEN_SIZE,
            "mlp_dim": 2 * HIDDEN_SIZE,
            "num_attention_heads": 2,
            "iou_head_hidden_dim": HIDDEN_SIZE,
        },
        "memory_attention_hidden_size": HIDDEN_SIZE,
        "memory_attention_feed_forward_hidden_size": 2 * HIDDEN_SIZE,
        "memory_attention_rope_feat_sizes": [grid, grid],
        "memory_encoder_hidden_size": HIDDEN_SIZE,
        "memory_encoder_output_channels": HIDDEN_SIZE // 2,
        "mask_downsampler_embed_dim": HIDDEN_SIZE,
        "memory_fuser_embed_dim": HIDDEN_SIZE,
        "memory_fuser_intermediate_dim": 2 * HIDDEN_SIZE,
    }
    config = Sam3VideoConfig(detector_config=detector, tracker_config=tracker, low_res_mask_size=4 * grid)
    config.image_size = image_size
    return config


def tiny_state_dict(config: Sam3VideoConfig, seed: int) -> dict[str, torch.Tensor]:
    """Seeded random weights with the real key layout, heads calibrated so scores straddle 0.5."""
    torch.manual_seed(seed)
    state = Sam3VideoModel(config).state_dict()
    with torch.no_grad():
        state["detector_model.detr_decoder.presence_head.layer3.bias"].fill_(PRESENCE_BIAS)
        state["detector_model.dot_product_scoring.query_proj.weight"].mul_(QUERY_PROJ_GAIN)
        state["detector_model.mask_decoder.mask_embedder.layers.2.weight"].mul_(CONCEPT_MASK_GAIN)
        state["detector_model.mask_decoder.mask_embedder.layers.2.bias"].mul_(CONCEPT_MASK_GAIN)
        state["tracker_model.mask_decoder.iou_prediction_head.proj_out.bias"].copy_(torch.tensor(TRACKER_IOU_BIAS))
        for key, tensor in state.items():
            if key.startswith("tracker_model.mask_decoder.output_hypernetworks_mlps.") and key.endswith("proj_out.weight"):
                tensor.mul_(TRACKER_MASK_GAIN)
    return {key: tensor.contiguous() for key, tensor in sorted(state.items())}


def build_tiny_checkpoint(out_dir: str | Path, image_size: int = 112, seed: int = 0) -> Path:
    """Write config, weights and processor files to `out_dir` and return it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = tiny_config(image_size)
    config.save_pretrained(out_dir)
    save_file(tiny_state_dict(config, seed), out_dir / "model.safetensors", metadata={"format": "pt"})
    vocab, merges = clip_vocab_and_merges()
    grid = image_size // PATCH_SIZE
    processor = Sam3Processor(
        image_processor=Sam3ImageProcessor(
            size={"height": image_size, "width": image_size},
            mask_size={"height": 4 * grid, "width": 4 * grid},
        ),
        tokenizer=CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=TEXT_MAX_TOKENS),
    )
    processor.save_pretrained(out_dir)
    (out_dir / TINY_MARKER_FILE).write_text(
        "Tiny random-weight SAM 3 checkpoint built by deployments.core.tiny_checkpoint.\n"
        "Its masks, boxes and scores are MEANINGLESS. It exists to test the real loading and serving code.\n"
        + json.dumps({"image_size": image_size, "seed": seed}) + "\n"
    )
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--size", type=int, default=112, help=f"model resolution, a multiple of {PATCH_SIZE}")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()
    out_dir = build_tiny_checkpoint(args.out_dir, args.size, args.seed)
    size_mb = sum(f.stat().st_size for f in out_dir.iterdir()) / 1e6
    print(
        f"built tiny SAM 3 checkpoint at {out_dir} ({size_mb:.1f} MB, {time.perf_counter() - started:.1f} s, "
        f"{args.size}x{args.size}). Its masks are meaningless: random weights, for tests and demos only."
    )


if __name__ == "__main__":
    main()
