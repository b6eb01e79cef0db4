"""Post-processing a large photo with many instances: time and peak memory, with and without detections.

    python -m benchmarks.large_photo [--height 3024] [--width 4032] [--instances 100] [--mask-size 288]

Each case runs in a fresh process, so its peak resident memory is its own; the figure printed is the
peak above the process's memory just before the work (inputs already made), beside the bytes of the
uint8 masks the answer describes. The same command runs against an older checkout of the project (the
one before masks were streamed), so before and after come from one command.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import time

import numpy as np


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def concept_output(instances: int, mask_size: int):
    """Random kept instances with blob-shaped masks covering a few percent of the image each."""
    from deployments.core.runner import ConceptOutput

    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(np.arange(mask_size), np.arange(mask_size), indexing="ij"), axis=-1)
    centres = rng.uniform(0, mask_size, size=(instances, 1, 1, 2))
    radii = rng.uniform(mask_size / 30, mask_size / 8, size=(instances, 1, 1))
    logits = (radii - np.linalg.norm(grid[None] - centres, axis=-1)).astype(np.float32)
    corners = np.sort(rng.uniform(0, 1, size=(instances, 2, 2)), axis=1).reshape(instances, 4)
    return ConceptOutput(
        scores=rng.uniform(0.5, 1, size=instances).astype(np.float32),
        boxes=corners[:, [0, 2, 1, 3]].astype(np.float32),
        mask_logits=logits,
    )


def run_case(args: argparse.Namespace, with_instances: bool, results: multiprocessing.Queue) -> None:
    import torch

    torch.set_num_threads(args.threads)
    output = concept_output(args.instances, args.mask_size)
    size = (args.height, args.width)
    from deployments.core import postprocess

    before = current_rss_bytes()
    started = time.perf_counter()
    if hasattr(postprocess, "encode_segmentation"):
        encoded = postprocess.encode_segmentation([output], size, args.chunk_pixels, with_instances=with_instances)
        masks = len(encoded.masks)
    else:  # the checkout before streaming: whole arrays first, then the wire response
        from deployments.postprocessor import to_response

        segmentation = postprocess.build_segmentation(output, size, 16)
        masks = len(to_response(segmentation, "text", with_instances).masks)
    seconds = time.perf_counter() - started
    results.put((seconds, peak_rss_bytes() - before, masks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--height", type=int, default=3024)
    parser.add_argument("--width", type=int, default=4032)
    parser.add_argument("--instances", type=int, default=100)
    parser.add_argument("--mask-size", type=int, default=288, help="the model's low-resolution mask size")
    parser.add_argument("--chunk-pixels", type=int, default=16_000_000, help="the postprocessor's budget")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a postprocessor replica has 1)")
    args = parser.parse_args()
    mask_bytes = args.instances * args.height * args.width
    print(
        f"{args.width}x{args.height}, {args.instances} instances from {args.mask_size}px masks, "
        f"{args.threads} torch thread(s); uint8 masks: {mask_bytes / 1e6:.0f} MB"
    )
    print(f"{'case':<34}{'seconds':>9}{'peak MB':>9}{'peak / masks':>14}")
    context = multiprocessing.get_context("spawn")
    for label, with_instances in (("run_with_detections (all masks)", True), ("run (union only)", False)):
        results = context.Queue()
        process = context.Process(target=run_case, args=(args, with_instances, results))
        process.start()
        seconds, peak, masks = results.get()
        process.join()
        print(f"{label:<34}{seconds:>9.2f}{peak / 1e6:>9.0f}{peak / mask_bytes:>14.2f}   ({masks} masks encoded)")


if __name__ == "__main__":
    main()
