"""A 4032x3024 photo with 100 instances, its masks encoded as RLE and outlined as polygons, stays within the
memory bound the answer had before polygons: a third of the bytes of the uint8 masks it describes
(`python -m benchmarks.large_photo` prints the figures of every case). Memory, unlike time, is the same on a
loaded machine, so the bound is asserted here."""

from __future__ import annotations

import argparse
import multiprocessing

from benchmarks.large_photo import run_case

HEIGHT, WIDTH, INSTANCES = 3024, 4032, 100


def test_outlining_a_large_photos_masks_stays_within_a_third_of_the_masks_bytes():
    args = argparse.Namespace(
        height=HEIGHT, width=WIDTH, instances=INSTANCES, mask_size=288, chunk_pixels=16_000_000, threads=1
    )
    context = multiprocessing.get_context("spawn")  # a fresh process: its peak memory is this case's own
    results = context.Queue()
    process = context.Process(target=run_case, args=(args, True, 1.0, results))
    process.start()
    _, _, peak_bytes, masks, outlined = results.get(timeout=600)
    process.join(timeout=60)
    assert masks == outlined == INSTANCES
    assert peak_bytes <= INSTANCES * HEIGHT * WIDTH / 3
