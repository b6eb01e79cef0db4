"""An interactive session's model time, in one process: the first request on an image, then follow-ups.

    python -m benchmarks.interactive_model [--preset tiny|mid|full | --checkpoint DIR] [--device cuda]
        [--dtype float32,bfloat16] [--sessions 5]

Each session is one new 480x640 image: a text prompt, then 10 follow-ups that alternate point and text
prompts (the next click, another concept). The model runner answers each alone, as a model replica does
for one user, with the vision-feature cache on and off side by side. Times are the runner's (the ViT, the
heads, copies to the host), medians over the sessions. Text encodings are cached in both runs after a
warm-up, as in the service. Built checkpoints have random weights (their masks are meaningless); they
cost what the real model costs, so the figures hold for it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from sam3_serve_core.checkpoint import load_sam3
from sam3_serve_core.pipeline import prepare_item
from sam3_serve_core.runner import Sam3Runner
from tests.conftest import random_image
from tools.tiny_checkpoint import PRESETS, build_tiny_checkpoint

FOLLOW_UPS = [
    {"points": [[320, 240]], "labels": [1]},
    {"text": "a red car"},
    {"points": [[320, 240], [100, 80]], "labels": [1, 0]},
    {"text": "a person"},
    {"points": [[200, 300]], "labels": [1]},
    {"text": "a dog"},
    {"points": [[200, 300], [400, 100]], "labels": [1, 0]},
    {"text": "a bicycle"},
    {"points": [[500, 400]], "labels": [1]},
    {"text": "a tree"},
]
FIRST = {"text": "a cat"}
CACHE_BYTES = 8 * 2**30


def timed_ms(function) -> float:
    synchronize = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    synchronize()
    started = time.perf_counter()
    function()
    synchronize()
    return (time.perf_counter() - started) * 1000


def session_times(runner: Sam3Runner, seed: int) -> tuple[float, list[float]]:
    """(first request ms, each follow-up's ms) for one new image; preparing the requests (CPU) is not timed."""
    models = runner.models
    image = random_image(480, 640, seed=seed)
    items = [
        prepare_item(image, tokenizer=models.tokenizer, geometry=models.geometry, checkpoint="bench", **prompt)
        for prompt in [FIRST, *FOLLOW_UPS]
    ]
    return timed_ms(lambda: runner.run(items[:1])), [timed_ms(lambda: runner.run([item])) for item in items[1:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--checkpoint", help="a checkpoint directory instead of building --preset")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help="comma-separated: float32,bfloat16")
    parser.add_argument("--sessions", type=int, default=5)
    args = parser.parse_args()
    started = time.perf_counter()
    checkpoint = args.checkpoint or str(build_tiny_checkpoint(tempfile.mkdtemp(), preset=args.preset))
    print(f"checkpoint: {args.checkpoint or args.preset + ' preset, random weights (masks meaningless)'} "
          f"({time.perf_counter() - started:.0f} s)")
    if torch.cuda.is_available():
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    rows = []
    for dtype in args.dtype.split(","):
        models = load_sam3(checkpoint, device=args.device, dtype=dtype)
        for cache_bytes in (CACHE_BYTES, 0):
            runner = Sam3Runner(models, 0.5, vision_cache_bytes=cache_bytes)
            session_times(runner, seed=10_000)  # warm-up: kernels, and every prompt's text encoding
            sessions = [session_times(runner, seed=seed) for seed in range(args.sessions)]
            first = statistics.median(times[0] for times in sessions)
            by_kind = {
                kind: statistics.median(
                    ms for times in sessions for prompt, ms in zip(FOLLOW_UPS, times[1]) if kind in prompt
                )
                for kind in ("text", "points")
            }
            follow_up = statistics.median(ms for times in sessions for ms in times[1])
            rows.append((dtype, "on" if cache_bytes else "off", first, follow_up, by_kind, runner.image_feature_bytes))
        del models
    print(f"\n{args.preset if not args.checkpoint else 'checkpoint'} on {args.device}, {args.sessions} sessions "
          f"of 1 + {len(FOLLOW_UPS)} prompts, model ms (median)")
    print("| dtype | cache | first request | follow-up | follow-up / first | text follow-up | point follow-up | one image's features |")
    print("|---|---|---|---|---|---|---|---|")
    for dtype, cache, first, follow_up, by_kind, feature_bytes in rows:
        print(f"| {dtype} | {cache} | {first:.1f} | {follow_up:.1f} | {follow_up / first:.1%} | {by_kind['text']:.1f} | "
              f"{by_kind['points']:.1f} | {feature_bytes / 1e6:.1f} MB |")


if __name__ == "__main__":
    main()
