"""The asyncio client against the blocking one with threads, at the same concurrency, through the application.

    python -m benchmarks.async_client [--preset tiny|mid | --checkpoint DIR] [--images 128] [--concurrency 32]
                                      [--rounds 3]

Starts the application (serve_config.yaml's CPU profile, as the tests start it) on a fresh local Ray, then
segments `--images` distinct 640x480 photos with one text prompt, every image sent as bytes
(`reuse_images=False`), with `Sam3HttpClient.run_many` (threads) and `AsyncSam3HttpClient.run_many` (tasks of
one event loop), both at `--concurrency`, in alternating rounds. Reports images/s and the CPU seconds this
process spent per image (the client's own cost: encoding, JSON, decoding, and its threads or event loop).
Random-weight checkpoints cost the same compute as real ones; their masks are meaningless.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import ray
from ray import serve

from benchmarks.compare import PRESETS, preset_checkpoint, write_photos
from benchmarks.machine import cpu_name, git_commit
from client import AsyncSam3HttpClient, Sam3Error, Sam3HttpClient
from tools.launch import cpu_config, free_port, serve_run, start_local_ray

TEXT = "cat"


def blocking_round(url: str, photos: list[Path], concurrency: int) -> int:
    with Sam3HttpClient(url, timeout=300, reuse_images=False) as client:
        results = client.run_many(photos, text=TEXT, concurrency=concurrency)
    return sum(isinstance(result, Sam3Error) for result in results)


def async_round(url: str, photos: list[Path], concurrency: int) -> int:
    async def main() -> int:
        async with AsyncSam3HttpClient(url, timeout=300, reuse_images=False) as client:
            results = [result async for result in client.run_many(photos, text=TEXT, concurrency=concurrency)]
        return sum(isinstance(result, Sam3Error) for result in results)

    return asyncio.run(main())


def timed(round_, url: str, photos: list[Path], concurrency: int) -> tuple[float, float, int]:
    """Wall seconds, this process's CPU seconds, and the errors of one round."""
    wall, cpu = time.perf_counter(), time.process_time()
    errors = round_(url, photos, concurrency)
    return time.perf_counter() - wall, time.process_time() - cpu, errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=PRESETS, default="tiny")
    source.add_argument("--checkpoint", type=Path)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each client, alternating")
    args = parser.parse_args()
    checkpoint = args.checkpoint or preset_checkpoint(args.preset)
    workdir = Path(tempfile.mkdtemp(prefix="sam3-async-"))
    photos, _ = write_photos(workdir, args.images)
    print(f"# benchmarks.async_client, commit {git_commit()}, {cpu_name()}; checkpoint {checkpoint.name} (random weights)")
    ray_address = start_local_ray()
    url = serve_run(cpu_config(str(checkpoint), free_port()), workdir / "config.yaml", ray_address)
    try:
        clients = {"Sam3HttpClient.run_many (threads)": blocking_round, "AsyncSam3HttpClient.run_many (tasks)": async_round}
        blocking_round(url, photos[: args.concurrency], args.concurrency)  # warm-up: every stage has run
        rounds: dict[str, list[tuple[float, float, int]]] = {name: [] for name in clients}
        for _ in range(args.rounds):
            for name, round_ in clients.items():
                rounds[name].append(timed(round_, url, photos, args.concurrency))
    finally:
        serve.shutdown()
        ray.shutdown()
    print(f"{args.images} distinct 640x480 photos a round, text {TEXT!r}, concurrency {args.concurrency}, "
          f"{args.rounds} rounds each (medians)\n")  # fmt: skip
    print("| client | images/s | client CPU ms per image | errors |")
    print("|---|---:|---:|---:|")
    for name, measured in rounds.items():
        wall = statistics.median(seconds for seconds, _, _ in measured)
        cpu = statistics.median(cpu for _, cpu, _ in measured)
        errors = sum(errors for _, _, errors in measured)
        print(f"| {name} | {args.images / wall:.2f} | {cpu / args.images * 1000:.2f} | {errors} |")


if __name__ == "__main__":
    main()
