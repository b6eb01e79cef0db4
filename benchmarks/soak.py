"""Soak run: sustained mixed load over HTTP with a share of bad requests; not part of the test run.

    python -m benchmarks.soak [--minutes 10] [--concurrency 32] [--bad-share 0.1] [--checkpoint DIR]

Starts the application from serve_config.yaml's CPU profile (with the tiny random-weight checkpoint
unless --checkpoint is given: its masks are meaningless) on its own Ray instance, sends requests of all
prompt types from `concurrency` threads for `minutes`, and reports requests answered, errors by code,
p50/p99 latency, and each replica's resident memory idle, after a warm-up of load (the start), and at
the end: it must stay flat from the start to the end.
Load goes to 127.0.0.1 only, bounded in time.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import random
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import ray
from PIL import Image
from ray import serve

from deployments.core.tiny_checkpoint import build_tiny_checkpoint
from deployments.launch import APP_NAME, cpu_config, free_port, serve_run

GOOD_PROMPTS = [
    {"text": "a red car"},
    {"text": "cat"},
    {"boxes": [[20, 30, 200, 180], [150, 40, 300, 220]], "labels": [1, 0]},
    {"points": [[120, 90]], "labels": [1]},
    {"points": [[120, 90], [250, 200]], "labels": [1, 0]},
]
BAD_PROMPTS = [
    {},
    {"text": "word " * 40},
    {"boxes": [[50, 50, 10, 10]], "labels": [1]},
    {"points": [[1, 2]], "labels": [7]},
    {"text": "cat", "points": [[1, 2]], "labels": [1]},
]


def encoded_images(count: int) -> list[str]:
    rng = np.random.default_rng(0)
    images = []
    for _ in range(count):
        height, width = rng.integers(120, 600, size=2)
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format="JPEG")
        images.append(base64.b64encode(buffer.getvalue()).decode())
    return images


def _resident_mb(_actor) -> float:
    """Runs inside a replica: its current resident memory, from /proc (Linux)."""
    resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 1e6


def replica_memory_mb() -> dict[str, float]:
    """Resident memory of every Serve replica process of the app, by replica name, read by each replica."""
    memory = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith(f"SERVE_REPLICA::{APP_NAME}#"):
            handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
            memory[actor["name"].split("::", 1)[1]] = ray.get(handle.__ray_call__.remote(_resident_mb))
    return memory


class Soak:
    def __init__(self, url: str, images: list[str], bad_share: float):
        self.url, self.images, self.bad_share = url, images, bad_share
        self.latencies: list[float] = []
        self.outcomes: Counter[str] = Counter()
        self.lock = threading.Lock()

    def worker(self, seed: int, stop_at: float) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=self.url, timeout=120) as client:
            while time.monotonic() < stop_at:
                bad = rng.random() < self.bad_share
                prompt = rng.choice(BAD_PROMPTS if bad else GOOD_PROMPTS)
                started = time.perf_counter()
                try:
                    response = client.post("/v1/segment", json={"image": rng.choice(self.images), **prompt})
                    outcome = "ok" if response.status_code == 200 else response.json()["error"]["code"]
                    outcome = f"{outcome} ({'bad' if bad else 'good'} request)"
                except Exception as error:  # the soak reports every failure kind instead of stopping
                    outcome = f"client error {type(error).__name__}"
                with self.lock:
                    self.latencies.append(time.perf_counter() - started)
                    self.outcomes[outcome] += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--bad-share", type=float, default=0.1)
    parser.add_argument("--checkpoint")
    parser.add_argument("--warmup-s", type=float, default=60, help="load before the start memory reading")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="sam3-soak-"))
    checkpoint = args.checkpoint or str(build_tiny_checkpoint(workdir / "tiny-112", image_size=112))
    if not args.checkpoint:
        print("tiny random-weight checkpoint: its masks are meaningless; this measures the service, not SAM 3")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    context = ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    try:
        url = serve_run(cpu_config(checkpoint, free_port()), workdir / "config.yaml", context.address_info["gcs_address"])
        soak = Soak(url, encoded_images(16), args.bad_share)
        memory_before_load = replica_memory_mb()
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=args.concurrency) as threads:
            for seed in range(args.concurrency):
                threads.submit(soak.worker, seed, started + args.minutes * 60)
            time.sleep(min(args.warmup_s, args.minutes * 30))
            memory_start = replica_memory_mb()
        elapsed = time.monotonic() - started
        memory_end = replica_memory_mb()
        report(soak, elapsed, args, memory_before_load, memory_start, memory_end)
    finally:
        serve.shutdown()
        ray.shutdown()


def report(soak: Soak, elapsed: float, args, memory_idle: dict, memory_start: dict, memory_end: dict) -> None:
    total = sum(soak.outcomes.values())
    latencies_ms = np.array(soak.latencies) * 1000
    print(f"soak: {elapsed / 60:.1f} min, concurrency {args.concurrency}, bad share {args.bad_share:.0%}")
    print(f"requests answered: {total} ({total / elapsed:.1f}/s)")
    for outcome, count in soak.outcomes.most_common():
        print(f"  {outcome}: {count}")
    print(f"latency p50 {np.percentile(latencies_ms, 50):.0f} ms, p99 {np.percentile(latencies_ms, 99):.0f} ms")
    print(f"replica resident memory (MB): idle / after {args.warmup_s:.0f} s of load (start) -> end (growth from start)")
    for name in sorted(memory_start):
        end = memory_end.get(name)
        growth = "replaced" if end is None else f"{end:.0f} ({end - memory_start[name]:+.0f})"
        print(f"  {name}: {memory_idle.get(name, float('nan')):.0f} / {memory_start[name]:.0f} -> {growth}")


if __name__ == "__main__":
    main()
