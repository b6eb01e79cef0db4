"""Throughput of the model runner: batched vs one request at a time, and shared vs repeated vision passes.

    python -m benchmarks.core_throughput [--checkpoint DIR] [--size 112] [--requests 64] [--device cpu]

Without --checkpoint it builds the tiny random-weight checkpoint (its masks are meaningless; it has the
real model's structure at a fraction of its cost, so figures here compare strategies, not hardware).
On a GPU, give the real checkpoint directory (random weights cost the same compute) and --device cuda.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from deployments.core.checkpoint import load_sam3
from deployments.core.pipeline import Sam3Pipeline
from deployments.core.tiny_checkpoint import build_tiny_checkpoint
from tests.conftest import random_image

PROMPTS = [{"text": "a red car"}, {"boxes": [[10, 12, 70, 60]], "labels": [1]}, {"points": [[50, 40]], "labels": [1]}]


def timed(function, repeats: int) -> float:
    """Median wall time of `repeats` calls, after one warm-up call."""
    function()
    samples = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        function()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint")
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    checkpoint = args.checkpoint or str(build_tiny_checkpoint(tempfile.mkdtemp(), image_size=args.size))
    if not args.checkpoint:
        print(f"tiny random-weight checkpoint at {args.size}px (masks meaningless; structure as the real model)")
    pipeline = Sam3Pipeline(load_sam3(checkpoint, device=args.device, dtype=args.dtype))
    images = [random_image(480, 640, seed=i) for i in range(args.requests)]
    items = [pipeline.prepare(image, **PROMPTS[i % len(PROMPTS)]) for i, image in enumerate(images)]
    batches = [items[i : i + args.batch_size] for i in range(0, len(items), args.batch_size)]

    one_at_a_time = timed(lambda: [pipeline.runner.run([item]) for item in items], args.repeats)
    batched = timed(lambda: [pipeline.runner.run(batch) for batch in batches], args.repeats)

    three_prompts = [pipeline.prepare(images[0], **prompt) for prompt in PROMPTS]
    shared = three_prompts[0].__class__(
        three_prompts[0].pixels, three_prompts[0].original_size, [p.prompts[0] for p in three_prompts]
    )
    repeated_vision = timed(lambda: pipeline.runner.run(three_prompts), args.repeats * 5)
    shared_vision = timed(lambda: pipeline.runner.run([shared]), args.repeats * 5)

    print(f"device={args.device} dtype={args.dtype} torch threads={torch.get_num_threads()}")
    print(f"{'strategy':<44}{'requests/s':>12}")
    print(f"{'one request per model call (baseline)':<44}{len(items) / one_at_a_time:>12.1f}")
    print(f"{f'batches of {args.batch_size} (mixed prompt types)':<44}{len(items) / batched:>12.1f}")
    print(f"{'3 prompts on 1 image, 3 items (3 ViT passes)':<44}{3 / repeated_vision:>12.1f}")
    print(f"{'3 prompts on 1 image, 1 item (1 ViT pass)':<44}{3 / shared_vision:>12.1f}")


if __name__ == "__main__":
    main()
