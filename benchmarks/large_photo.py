"""Post-processing a large photo with many instances: time and peak memory, with and without detections, and
with the masks outlined as polygons.

    python -m benchmarks.large_photo [--height 3024] [--width 4032] [--instances 100] [--mask-size 288]

Both halves, on the CPU: finishing the masks (upsample, threshold, bit-pack: the model replica's part, on
its device) and encoding them as RLE (the postprocessor's part, with `polygons` also outlining them). Each case runs in a fresh process, so its
peak resident memory is its own; the figure printed is the peak above the process's memory just before
the work (inputs already made), beside the bytes of the uint8 masks the answer describes.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time

import numpy as np


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's own peak resident memory (VmHWM). Not `ru_maxrss`: Linux carries that over `exec` from
    the forked copy of the parent, so a child of a large process would report the parent's size."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def concept_output(instances: int, mask_size: int):
    """Random kept instances with blob-shaped masks covering a few percent of the image each."""
    import torch

    from sam3_serve_core.postprocess import ConceptOutput

    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(np.arange(mask_size), np.arange(mask_size), indexing="ij"), axis=-1)
    centres = rng.uniform(0, mask_size, size=(instances, 1, 1, 2))
    radii = rng.uniform(mask_size / 30, mask_size / 8, size=(instances, 1, 1))
    logits = (radii - np.linalg.norm(grid[None] - centres, axis=-1)).astype(np.float32)
    corners = np.sort(rng.uniform(0, 1, size=(instances, 2, 2)), axis=1).reshape(instances, 4)
    return ConceptOutput(
        scores=torch.tensor(rng.uniform(0.5001, 1, size=instances), dtype=torch.float32),
        boxes=torch.tensor(corners[:, [0, 2, 1, 3]], dtype=torch.float32),
        mask_logits=torch.tensor(logits),
        score_threshold=0.5,
    )


def run_case(
    args: argparse.Namespace, with_instances: bool, polygon_tolerance: float | None, results: multiprocessing.Queue
) -> None:
    import torch

    from sam3_serve_core.postprocess import encode_segmentation, finish_segmentation

    torch.set_num_threads(args.threads)
    output = concept_output(args.instances, args.mask_size)
    size = (args.height, args.width)
    before = current_rss_bytes()
    started = time.perf_counter()
    packed = finish_segmentation([output], size, chunk_pixels=args.chunk_pixels, with_instances=with_instances)
    finished = time.perf_counter()
    encoded = encode_segmentation(packed, args.chunk_pixels, polygon_tolerance)
    encoded_at = time.perf_counter()
    outlined = sum(1 for regions in encoded.polygons or [] if regions)
    results.put((finished - started, encoded_at - finished, peak_rss_bytes() - before, len(encoded.masks), outlined))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--height", type=int, default=3024)
    parser.add_argument("--width", type=int, default=4032)
    parser.add_argument("--instances", type=int, default=100)
    parser.add_argument("--mask-size", type=int, default=288, help="the model's low-resolution mask size")
    parser.add_argument("--chunk-pixels", type=int, default=16_000_000, help="mask_chunk_pixels")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    mask_bytes = args.instances * args.height * args.width
    print(
        f"{args.width}x{args.height}, {args.instances} instances from {args.mask_size}px masks, "
        f"{args.threads} torch thread(s); uint8 masks: {mask_bytes / 1e6:.0f} MB"
    )
    print(f"{'case':<34}{'finish s':>9}{'encode s':>9}{'peak MB':>9}{'peak / masks':>14}")
    context = multiprocessing.get_context("spawn")
    cases = (
        ("run_with_detections (all masks)", True, None),
        ("run_with_detections, polygons", True, 1.0),
        ("run (union only)", False, None),
    )
    for label, with_instances, polygon_tolerance in cases:
        results = context.Queue()
        process = context.Process(target=run_case, args=(args, with_instances, polygon_tolerance, results))
        process.start()
        finish_s, encode_s, peak, masks, outlined = results.get()
        process.join()
        print(
            f"{label:<34}{finish_s:>9.2f}{encode_s:>9.2f}{peak / 1e6:>9.0f}{peak / mask_bytes:>14.2f}"
            f"   ({masks} masks encoded, {outlined} outlined)"
        )


if __name__ == "__main__":
    main()
