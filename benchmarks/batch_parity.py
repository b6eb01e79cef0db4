"""How far an answer moves with its batch companions: each item batched with others against itself alone.

    python -m benchmarks.batch_parity [--sizes 56,112] [--batches 20] [--batch-sizes 4,8] [--checkpoint DIR]
                                      [--device cpu]

On a CPU a batch of 4 and a batch of 1 run different matrix kernels, so an image's logits differ in their
last bits with the batch it ran in; the service batches requests as they arrive (and caches the features
and text encodings a batch computed), so its answers differ from the in-process pipeline's by that much.
This measures it through the public pipeline (`Sam3Pipeline.prepare` + `segment_batch` against `segment`
alone, a fresh pipeline each time so no text encoding comes from another batch) with the comparison the
tests use (`tests/answers.py`), and prints the figures its bounds are set from. Each batch mixes random
images (24x24 to 120x120, and one in four 480x640) with random prompts: a text, two texts, a box, a point.
Without --checkpoint it uses the tiny random-weight test checkpoints: their masks are meaningless, only the
agreement matters.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import torch

from sam3_serve_core.checkpoint import load_sam3
from sam3_serve_core.pipeline import Sam3Pipeline
from tests.answers import SCORE_THRESHOLD, allowed_pixels, differences, expect
from tests.conftest import random_image, tiny_checkpoint_dir

TEXTS = ("a red car", "cat", "dog", "sofa", "striped dog")


@dataclass
class Totals:
    items: int = 0
    instances: int = 0
    compared_pixels: int = 0
    differing_pixels: int = 0  # over matched instances' masks and the unions
    max_mask_pixels: int = 0
    max_mask_fraction: float = 0.0  # of the image, one mask or the union
    max_score_diff: float = 0.0
    max_box_diff_px: float = 0.0
    maybe_flipped: int = 0
    out_of_bounds: int = 0
    max_logit_diff: float = 0.0


def random_prompt(rng: np.random.Generator, height: int, width: int) -> dict:
    kind = rng.integers(0, 4)
    if kind == 0:
        return {"text": TEXTS[rng.integers(0, len(TEXTS))]}
    if kind == 1:
        return {"text": [str(text) for text in rng.choice(TEXTS, 2, replace=False)]}
    if kind == 2:
        x0, y0 = rng.uniform(0, width / 2), rng.uniform(0, height / 2)
        return {"boxes": [[x0, y0, x0 + rng.uniform(4, width / 2), y0 + rng.uniform(4, height / 2)]], "labels": [1]}
    return {"points": [[rng.uniform(0, width), rng.uniform(0, height)]], "labels": [1]}


def measure(checkpoint: str, batches: int, batch_size: int, seed: int = 0, device: str = "cpu") -> Totals:
    models = load_sam3(checkpoint, device=device)
    totals = Totals()
    for batch in range(batches):
        rng = np.random.default_rng([seed, batch_size, batch])
        cases = []
        for index in range(batch_size):
            height, width = (480, 640) if rng.random() < 0.25 else tuple(int(v) for v in rng.integers(24, 121, size=2))
            image = random_image(height, width, seed=int(rng.integers(0, 2**31)))
            cases.append((image, random_prompt(rng, height, width)))
        batched_pipeline = Sam3Pipeline(models)
        batched = batched_pipeline.segment_batch([batched_pipeline.prepare(image, **prompt) for image, prompt in cases])
        totals.max_logit_diff = max(totals.max_logit_diff, _max_logit_diff(models, cases))
        for (image, prompt), answer in zip(cases, batched):
            expected = expect(Sam3Pipeline(models), image, **prompt)  # alone, with the threshold lowered
            found = differences(answer, expected)
            height, width = image.shape[:2]
            totals.items += 1
            totals.instances += found.instances
            totals.compared_pixels += found.compared_pixels
            totals.differing_pixels += found.mask_pixels + found.union_pixels
            worst = max(found.max_mask_pixels, found.union_pixels)
            totals.max_mask_pixels = max(totals.max_mask_pixels, worst)
            totals.max_mask_fraction = max(totals.max_mask_fraction, worst / (height * width))
            totals.max_score_diff = max(totals.max_score_diff, found.max_score_diff)
            totals.max_box_diff_px = max(totals.max_box_diff_px, found.max_box_diff_px)
            totals.maybe_flipped += found.maybe_flipped
            totals.out_of_bounds += bool(found.problems)
            if found.problems:
                print(f"  out of bounds (batch {batch}, {height}x{width}, {prompt}): {found.problems}")
    return totals


def _max_logit_diff(models, cases: list[tuple[np.ndarray, dict]]) -> float:
    """The raw mask logits of every query (no threshold), batched against alone: the runner's own output."""
    pipeline = Sam3Pipeline(models, score_threshold=float("-inf"))
    items = [pipeline.prepare(image, **prompt) for image, prompt in cases]
    batched = Sam3Pipeline(models, score_threshold=float("-inf")).runner.forward(items)
    worst = 0.0
    for item, outputs in zip(items, batched):
        alone = Sam3Pipeline(models, score_threshold=float("-inf")).runner.forward([item])[0]
        for a, b in zip(alone, outputs):
            if a.mask_logits.numel():
                worst = max(worst, float((a.mask_logits.float() - b.mask_logits.float()).abs().max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="56,112", help="tiny checkpoints' resolutions")
    parser.add_argument("--checkpoint", help="measure this checkpoint instead of the tiny ones")
    parser.add_argument("--batches", type=int, default=20, help="batches per batch size and checkpoint")
    parser.add_argument("--batch-sizes", default="4,8")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    checkpoints = [args.checkpoint] if args.checkpoint else [str(tiny_checkpoint_dir(size)) for size in sizes]
    print(f"score threshold {SCORE_THRESHOLD}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"device {args.device}")
    print(f"{'checkpoint':<28}{'batch':>6}{'items':>7}{'inst':>6}{'pixels':>11}{'differ':>7}{'max/mask':>9}"
          f"{'max frac':>10}{'|dscore|':>10}{'|dbox| px':>11}{'|dlogit|':>10}{'flips':>6}{'out':>5}")  # fmt: skip
    grand = Totals()
    for checkpoint in checkpoints:
        for batch_size in (int(size) for size in args.batch_sizes.split(",")):
            started = time.perf_counter()
            t = measure(checkpoint, args.batches, batch_size, args.seed, args.device)
            print(f"{checkpoint.rstrip('/').rsplit('/', 1)[-1][:27]:<28}{batch_size:>6}{t.items:>7}{t.instances:>6}"
                  f"{t.compared_pixels:>11}{t.differing_pixels:>7}{t.max_mask_pixels:>9}{t.max_mask_fraction:>10.2e}"
                  f"{t.max_score_diff:>10.1e}{t.max_box_diff_px:>11.1e}{t.max_logit_diff:>10.1e}{t.maybe_flipped:>6}"
                  f"{t.out_of_bounds:>5}   ({time.perf_counter() - started:.0f} s)")  # fmt: skip
            for name, value in vars(t).items():
                merge = max if name.startswith("max") else (lambda a, b: a + b)
                setattr(grand, name, merge(getattr(grand, name), value))
    print(f"all: {grand}")
    print(f"bound per mask: {allowed_pixels(24, 24)} pixels for 24x24 ... {allowed_pixels(480, 640)} for 480x640")


if __name__ == "__main__":
    main()
