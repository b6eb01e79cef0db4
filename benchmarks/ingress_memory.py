"""What the ingress keeps of the requests it answered: its private memory and its reference table under load.

    python -m benchmarks.ingress_memory [--requests 3000] [--concurrency 8] [--checkpoint DIR]

Starts the application (serve_config.yaml's CPU profile, with the tiny random-weight checkpoint unless
--checkpoint is given: its masks are meaningless) on a fresh local Ray, then sends `--requests` text prompts
on distinct images (`reuse_images=False`) and, after every tenth of them, reads inside the ingress replica its
memory from /proc (private `RssAnon`, file-backed `RssFile`, shared `RssShmem`, which holds pages of the
object store mapped in) and how many objects its core worker holds references to. An ingress that lets go of
what it answered stays flat in both; a per-request leak shows as a steady climb.
"""

from __future__ import annotations

import argparse
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import ray
from ray import serve

from benchmarks.machine import cpu_name, git_commit
from client import Sam3HttpClient
from tests.serve.app_runner import ingress_actor, ingress_references
from tools.launch import cpu_config, free_port, serve_run, start_local_ray
from tools.tiny_checkpoint import build_tiny_checkpoint

MEMORY_FIELDS = ("RssAnon", "RssFile", "RssShmem")


def _memory_mb(_actor) -> dict[str, float]:
    """Runs inside the ingress: its resident memory by kind, in MB, from /proc/self/status."""
    readings = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in MEMORY_FIELDS:
            readings[name] = int(value.split()[0]) / 1024
    return readings


def reading(sent: int) -> str:
    memory = ray.get(ingress_actor().__ray_call__.remote(_memory_mb))
    kinds = " | ".join(f"{memory[name]:.0f}" for name in MEMORY_FIELDS)
    return f"| {sent} | {kinds} | {ingress_references()} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--checkpoint", help="a checkpoint directory (default: the tiny one, built here)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="ingress-memory-"))
    checkpoint = args.checkpoint or str(build_tiny_checkpoint(workdir / "tiny"))
    ray_address = start_local_ray()
    try:
        url = serve_run(cpu_config(checkpoint, free_port()), workdir / "config.yaml", ray_address)
        rng = np.random.default_rng(0)
        images = [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for _ in range(64)]
        print(f"{cpu_name()}, commit {git_commit()}: `python -m benchmarks.ingress_memory --requests {args.requests} "
              f"--concurrency {args.concurrency}`\n")  # fmt: skip
        print("| requests answered | RssAnon MB | RssFile MB | RssShmem MB | references held |")
        print("|---:|---:|---:|---:|---:|")
        print(reading(0), flush=True)
        step = max(args.requests // 10, 1)
        with Sam3HttpClient(url, timeout=120, reuse_images=False) as client, ThreadPoolExecutor(args.concurrency) as pool:
            for start in range(0, args.requests, step):
                batch = range(start, min(start + step, args.requests))
                list(pool.map(lambda index: client.run(images[index % len(images)], text="cat"), batch))
                print(reading(batch[-1] + 1), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
