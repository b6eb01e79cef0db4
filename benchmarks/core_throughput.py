"""Throughput of the model runner: batched vs one request at a time, and shared vs repeated vision passes.

    python -m benchmarks.core_throughput [--checkpoint DIR] [--size 112] [--requests 64] [--batch-size 8,16] [--device cpu]
                                         [--dtype auto] [--prompts mixed|text] [--score-threshold T]
                                         [--max-instances K] [--profile] [--autocast]
                                         [--compile all|vision,detr_encoder,detr_decoder]

Without --checkpoint it builds the tiny random-weight checkpoint (its masks are meaningless; it has the
real model's structure at a fraction of its cost, so figures here compare strategies, not hardware).
On a GPU, give the real checkpoint directory (random weights cost the same compute) and --device cuda.
Each request is a distinct 640x480 image. `runner.run` is the model replica's whole work: the forward pass
and the answer finished on the device (masks upsampled, thresholded and bit-packed) and copied to the host.
--profile adds, for one batch, the split between the forward pass and finishing, and the operations that
take the most device time (torch.profiler). --compile compiles those stacks of layers (the application's
`compile: true` compiles all three) and reports the warm-up passes that compile them.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time

import torch

from sam3_serve_core.checkpoint import load_sam3
from sam3_serve_core.compilation import REGIONS
from sam3_serve_core.pipeline import Sam3Pipeline, warm_up
from tests.conftest import random_image
from tools.tiny_checkpoint import build_tiny_checkpoint

PROMPTS = [{"text": "a red car"}, {"boxes": [[10, 12, 70, 60]], "labels": [1]}, {"points": [[50, 40]], "labels": [1]}]
TEXT_PROMPTS = [{"text": "a red car"}]


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(function, repeats: int) -> float:
    """Median wall time of `repeats` calls, after one warm-up call."""
    function()
    samples = []
    for _ in range(repeats):
        synchronize()
        started = time.perf_counter()
        function()
        synchronize()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def profile(pipeline: Sam3Pipeline, batch: list) -> None:
    """Forward pass against forward + finish for one batch, then the top device operations of one run."""
    forward_s = timed(lambda: pipeline.runner.forward(batch), 5)
    run_s = timed(lambda: pipeline.runner.run(batch), 5)
    print(f"one batch of {len(batch)}: forward {forward_s * 1000:.1f} ms, forward + finish + copy {run_s * 1000:.1f} ms")
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        pipeline.runner.run(batch)
        synchronize()
    sort_by = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    print(profiler.key_averages().table(sort_by=sort_by, row_limit=20, max_name_column_width=60))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint")
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument(
        "--batch-size",
        type=lambda value: [int(size) for size in value.split(",")],
        default=[8],
        help="batches of each of these sizes, comma-separated",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16, float16 or auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", choices=["mixed", "text"], default="mixed")
    parser.add_argument("--score-threshold", type=float, default=0.5)
    parser.add_argument("--max-instances", type=int, help="answer with at most this many instances per request")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--autocast", action="store_true", help="run the --dtype weights under torch.autocast(bfloat16) (give float32)"
    )
    parser.add_argument(
        "--compile",
        type=lambda value: tuple(REGIONS) if value == "all" else tuple(value.split(",")),
        default=(),
        help=f"torch.compile these stacks of layers: all, or some of {','.join(REGIONS)}",
    )
    args = parser.parse_args()
    checkpoint = args.checkpoint or str(build_tiny_checkpoint(tempfile.mkdtemp(), image_size=args.size))
    if not args.checkpoint:
        print(f"tiny random-weight checkpoint at {args.size}px (masks meaningless; structure as the real model)")
    started = time.perf_counter()
    models = load_sam3(
        checkpoint, device=args.device, dtype=args.dtype, compile=bool(args.compile), compile_regions=args.compile
    )
    synchronize()
    print(f"checkpoint loaded onto {args.device} in {time.perf_counter() - started:.1f} s")
    pipeline = Sam3Pipeline(models, score_threshold=args.score_threshold)
    precision = torch.autocast(args.device, dtype=torch.bfloat16) if args.autocast else contextlib.nullcontext()
    with precision:
        if models.compiled:
            passes = warm_up(pipeline.runner)
            print(f"compiled {','.join(args.compile)}: warm-up passes took {' + '.join(f'{s:.1f}' for s in passes)} s")
        measure(pipeline, args)


def measure(pipeline: Sam3Pipeline, args: argparse.Namespace) -> None:
    images = [random_image(480, 640, seed=i) for i in range(args.requests)]
    prompts = PROMPTS if args.prompts == "mixed" else TEXT_PROMPTS
    items = [
        pipeline.prepare(image, max_instances=args.max_instances, **prompts[i % len(prompts)])
        for i, image in enumerate(images)
    ]
    batches_by_size = {
        size: [items[i : i + size] for i in range(0, len(items), size)] for size in args.batch_size
    }
    first_batch = batches_by_size[args.batch_size[0]][0]
    instances = [len(answer.scores) for answer in pipeline.runner.run(first_batch)]

    one_at_a_time = timed(lambda: [pipeline.runner.run([item]) for item in items], args.repeats)
    batched = {
        size: timed(lambda: [pipeline.runner.run(batch) for batch in batches], args.repeats)
        for size, batches in batches_by_size.items()
    }

    three_prompts = [pipeline.prepare(images[0], **prompt) for prompt in PROMPTS]
    shared = three_prompts[0].__class__(
        three_prompts[0].pixels, three_prompts[0].original_size, [p.prompts[0] for p in three_prompts]
    )
    repeated_vision = timed(lambda: pipeline.runner.run(three_prompts), args.repeats * 5)
    shared_vision = timed(lambda: pipeline.runner.run([shared]), args.repeats * 5)

    print(
        f"device={args.device} dtype={pipeline.models.dtype}{' under bf16 autocast' if args.autocast else ''} "
        f"compiled={','.join(args.compile) or 'none'} torch threads={torch.get_num_threads()} "
        f"prompts={args.prompts} score threshold={args.score_threshold} max instances={args.max_instances} "
        f"instances per answer (first batch)={statistics.mean(instances):.1f}"
    )
    print(f"{'strategy':<44}{'requests/s':>12}")
    print(f"{'one request per model call (baseline)':<44}{len(items) / one_at_a_time:>12.1f}")
    for size, seconds in batched.items():
        print(f"{f'batches of {size} ({args.prompts} prompts)':<44}{len(items) / seconds:>12.1f}")
    print(f"{'3 prompts on 1 image, 3 items (3 ViT passes)':<44}{3 / repeated_vision:>12.1f}")
    print(f"{'3 prompts on 1 image, 1 item (1 ViT pass)':<44}{3 / shared_vision:>12.1f}")
    if args.profile:
        profile(pipeline, first_batch)


if __name__ == "__main__":
    main()
