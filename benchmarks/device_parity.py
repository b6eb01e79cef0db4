"""Masks finished on the GPU against the same raw outputs finished on the CPU: what moves, and by how much.

    python -m benchmarks.device_parity --checkpoint DIR [--dtype bfloat16] [--images 8]

The model runs once per image on the GPU; its raw outputs (scores, boxes, low-resolution mask logits) are
finished twice by `postprocess.finish_segmentation`, once where they are and once copied to the CPU (what
the postprocessor did before masks were finished in the model replica). Scores and boxes are the same
arithmetic on the same numbers; full-size masks can differ where an upsampled value lies within rounding of
the threshold, since the GPU's bilinear kernel rounds differently from the CPU's.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import torch

from sam3_serve_core.checkpoint import load_sam3
from sam3_serve_core.pipeline import Sam3Pipeline
from sam3_serve_core.postprocess import finish_segmentation, unpack_segmentation
from tests.conftest import random_image

PROMPTS = (
    {"text": "a red car"},
    {"text": ["a red car", "cat", "dog"], "max_instances": 5},
    {"points": [[320, 240]], "labels": [1]},
)


def on_cpu(output):
    tensors = {
        member.name: getattr(output, member.name).cpu()
        for member in dataclasses.fields(output)
        if isinstance(getattr(output, member.name), torch.Tensor)
    }
    return dataclasses.replace(output, **tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--images", type=int, default=8)
    args = parser.parse_args()
    pipeline = Sam3Pipeline(load_sam3(args.checkpoint, device="cuda", dtype=args.dtype))
    differing, pixels, instances, equal_scores, equal_boxes = 0, 0, 0, True, True
    for seed in range(args.images):
        for prompt in PROMPTS:
            item = pipeline.prepare(random_image(480, 640, seed=seed), **prompt)
            (outputs,) = pipeline.runner.forward([item])
            size = item.original_size
            options = {"chunk_pixels": 16_000_000, "max_instances": item.max_instances}
            gpu = unpack_segmentation(finish_segmentation(outputs, size, **options))
            cpu = unpack_segmentation(finish_segmentation([on_cpu(o) for o in outputs], size, **options))
            equal_scores &= np.array_equal(gpu.scores, cpu.scores)
            equal_boxes &= np.array_equal(gpu.boxes, cpu.boxes)
            masks = [np.concatenate([s.masks.reshape(-1), s.union_mask.reshape(-1)]) for s in (gpu, cpu)]
            differing += int((masks[0] != masks[1]).sum())
            pixels += masks[0].size
            instances += len(gpu.scores)
    print(
        f"{args.images} images x {len(PROMPTS)} prompts, {args.dtype}, {instances} instances: scores equal {equal_scores}, "
        f"boxes equal {equal_boxes}, mask pixels differing {differing} of {pixels} ({differing / max(pixels, 1):.2e})"
    )


if __name__ == "__main__":
    main()
