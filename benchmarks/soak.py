"""Soak run: the mixed traffic of production, all at once, for a long time; not part of the test run.

    python -m benchmarks.soak [--minutes 30] [--sessions 4] [--http 8] [--bad-share 0.1] [--job-images 48]
                              [--model-replicas 2] [--checkpoint DIR] [--trace-ingress]

Starts the application from serve_config.yaml's CPU profile with `--model-replicas` model replicas (with the
tiny random-weight checkpoint unless --checkpoint is given: its masks are meaningless) on its own Ray
instance, and sends three kinds of traffic at once for `--minutes`:
- **interactive**: `--sessions` users, each on a new image: a text prompt with the image, then follow-ups
  of every prompt type that name the image by the `image_id` of the first answer (the image is sent again
  when the service answers 404 `image_not_cached`, as the clients do);
- **http**: `--http` callers of single requests of every prompt type on a pool of images of many sizes,
  a `--bad-share` of them bad on purpose (no prompt, a prompt too long, an inverted box, a bad label, two
  prompt types, an image that does not decode, an unknown field, an unknown image id);
- **job**: the Ray job `pipelines.segment --via service` over `--job-images` images, run again and again.

Good prompts are made for each image from its own size, so a good request is refused only by a fault.
Reported per kind: requests, answers by status and code, lost requests (sent, with no answer and no typed
error; a job's (image, prompt) missing from its output or there twice), unexpected answers (a good
request not answered 200, a bad one not answered 4xx), p50/p99 latency, and the vision-feature cache's
hit rate. Then each model, pre- and postprocessor replica's resident memory after `--warmup-s` of load
(start) and at the end: flat means it grew by at most `FLAT_GROWTH_MB` or `FLAT_GROWTH_SHARE` of its start,
whichever is more (allocator slack, not a leak), beyond what a model replica's vision-feature cache filled in
that time (bounded by `vision_cache_bytes`, so not a leak either). Exits 1 if anything was lost or unexpected
or a replica's memory was not flat. Load goes to 127.0.0.1 only. `--trace-ingress` also traces the ingress's
Python allocations (tracemalloc) from the start reading and prints where they grew most: where its memory
goes, at the cost of a slower ingress.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import ray
from PIL import Image
from ray import serve

from benchmarks.machine import cpu_name, git_commit
from client.protocol import SEGMENT_PATH
from tests.serve.app_runner import deployment, ingress_actor, replica_stats
from tools.launch import APP_NAME, REPO, cpu_config, free_port, serve_run, start_local_ray
from tools.profiles import MODEL_POOL
from tools.tiny_checkpoint import build_tiny_checkpoint

FLAT_GROWTH_MB = 100.0
FLAT_GROWTH_SHARE = 0.10
TEXTS = ["a red car", "cat", "person", "a tree"]
FOLLOW_UPS = 4
REQUEST_TIMEOUT_S = 120


def answered(status: int) -> bool:
    return status == 200


def refused(status: int) -> bool:
    return 400 <= status < 500


def answered_or_evicted(status: int) -> bool:
    """A follow-up by image id: answered from the cache, or 404 when its features were evicted."""
    return status in (200, 404)


@dataclass(frozen=True)
class SoakImage:
    """One JPEG of the soak, with its size, from which its good prompts are made."""

    base64: str
    width: int
    height: int

    @classmethod
    def random(cls, rng: np.random.Generator) -> SoakImage:
        height, width = (int(side) for side in rng.integers(64, 600, size=2))
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format="JPEG")
        return cls(base64.b64encode(buffer.getvalue()).decode(), width, height)


def good_prompt(rng: random.Random, width: int, height: int) -> dict:
    """A valid prompt of a random type, every point and box inside a `width` x `height` image."""
    kind = rng.choice(["text", "texts", "boxes", "points"])
    if kind == "text":
        return {"text": rng.choice(TEXTS)}
    if kind == "texts":
        return {"text": rng.sample(TEXTS, 2)}
    if kind == "boxes":
        x0, y0 = rng.uniform(0, width / 2), rng.uniform(0, height / 2)
        box = [x0, y0, rng.uniform(x0 + 1, width), rng.uniform(y0 + 1, height)]
        return {"boxes": [[round(value, 1) for value in box]], "labels": [1]}
    count = rng.randint(1, 3)
    points = [[rng.randrange(width), rng.randrange(height)] for _ in range(count)]
    return {"points": points, "labels": [1] + [rng.randint(0, 1) for _ in range(count - 1)]}


def bad_request(rng: random.Random, image: SoakImage) -> dict:
    """A request the service must refuse with a 4xx."""
    fields = {"image": image.base64}
    return rng.choice([
        fields,
        {**fields, "text": "word " * 60},
        {**fields, "boxes": [[50, 50, 10, 10]], "labels": [1]},
        {**fields, "points": [[1, 2]], "labels": [7]},
        {**fields, "text": "cat", "points": [[1, 2]], "labels": [1]},
        {"image": base64.b64encode(b"not an image").decode(), "text": "cat"},
        {**fields, "text": "cat", "colour": "red"},
        {"image_id": "0" * 32 + "-64x64", "text": "cat"},
    ])  # fmt: skip


@dataclass
class KindTally:
    """What one kind of traffic got: answers by status and code, latencies, and what went wrong."""

    answers: Counter[str] = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)
    lost: int = 0
    unexpected: Counter[str] = field(default_factory=Counter)
    cache_lookups: Counter[str] = field(default_factory=Counter)  # interactive follow-ups: hit or miss
    lock: threading.Lock = field(default_factory=threading.Lock)

    def post(self, client: httpx.Client, body: dict, expected: Callable[[int], bool]) -> httpx.Response | None:
        """Send one request and record its answer; None when it was lost (no answer, no typed error)."""
        started = time.perf_counter()
        try:
            response = client.post(SEGMENT_PATH, json=body, timeout=REQUEST_TIMEOUT_S)
            outcome = "200" if response.status_code == 200 else f"{response.status_code} {response.json()['error']['code']}"
        except Exception as error:  # the soak counts every failure instead of stopping
            with self.lock:
                self.lost += 1
                self.unexpected[f"lost: {type(error).__name__}"] += 1
            return None
        with self.lock:
            self.latencies_s.append(time.perf_counter() - started)
            self.answers[outcome] += 1
            if not expected(response.status_code):
                self.unexpected[f"{expected.__name__}, got {outcome}"] += 1
        return response


def interactive_session(tally: KindTally, url: str, seed: int, stop: threading.Event) -> None:
    """Sessions one after another, each on a new image: a first request, then follow-ups by image id."""
    rng, pixels = random.Random(seed), np.random.default_rng(seed)
    with httpx.Client(base_url=url) as client:
        while not stop.is_set():
            image = SoakImage.random(pixels)
            first = tally.post(client, {"image": image.base64, "text": rng.choice(TEXTS)}, answered)
            image_id = first.json().get("image_id") if first is not None and first.status_code == 200 else None
            for _ in range(FOLLOW_UPS):
                prompt = good_prompt(rng, image.width, image.height)
                if image_id is None:
                    tally.post(client, {"image": image.base64, **prompt}, answered)
                    continue
                answer = tally.post(client, {"image_id": image_id, **prompt}, answered_or_evicted)
                hit = answer is not None and answer.status_code == 200
                with tally.lock:
                    tally.cache_lookups["hit" if hit else "miss"] += 1
                if not hit:  # evicted (404): the image goes again, as the clients send it
                    again = tally.post(client, {"image": image.base64, **prompt}, answered)
                    image_id = again.json().get("image_id") if again is not None and again.status_code == 200 else None


def http_caller(tally: KindTally, url: str, images: list[SoakImage], bad_share: float, seed: int, stop: threading.Event) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=url) as client:
        while not stop.is_set():
            image = rng.choice(images)
            if rng.random() < bad_share:
                tally.post(client, bad_request(rng, image), refused)
            else:
                tally.post(client, {"image": image.base64, **good_prompt(rng, image.width, image.height)}, answered)


def job_runs(tally: KindTally, ray_address: str, image_dir: Path, workdir: Path, stop: threading.Event) -> None:
    """`pipelines.segment --via service` over the same images, again and again, each run into a new output."""
    images = sorted(path.name for path in image_dir.iterdir())
    environment = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ray_address}
    run = 0
    while not stop.is_set():
        output = workdir / f"job-{run}"
        started = time.perf_counter()
        finished = subprocess.run(
            [sys.executable, "-m", "pipelines.segment", "--input", str(image_dir), "--output", str(output),
             "--text", "a red car", "--via", "service", "--workers", "1", "--max-in-flight", "4"],
            cwd=REPO, env=environment, capture_output=True, text=True,
        )  # fmt: skip
        elapsed = time.perf_counter() - started
        rows = pq.read_table(output, columns=["image", "error_code"]).to_pylist() if output.exists() else []
        seen = Counter(Path(row["image"]).name for row in rows)
        with tally.lock:
            tally.latencies_s.append(elapsed)
            tally.lost += sum(1 for name in images if seen[name] != 1)
            if finished.returncode != 0:
                tally.unexpected[f"job exited {finished.returncode}: {finished.stderr.strip().splitlines()[-1:]}"] += 1
            for row in rows:
                outcome = "200" if row["error_code"] is None else row["error_code"]
                tally.answers[outcome] += 1
                if row["error_code"] is not None:
                    tally.unexpected[f"good row: {outcome}"] += 1
        run += 1


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


def cache_mb_by_replica(replicas: int, patience_s: float = 60) -> dict[str, float]:
    """MB each model replica's vision-feature caches hold, by its name among `replica_memory_mb`'s.

    Calls that name no image go to the less busy of two replicas, so under load one replica may answer them
    all for a while: this asks for up to `patience_s`, and a replica that has not answered by then is left out
    (it is then judged on its whole growth, with no allowance for its cache)."""
    handle = serve.get_deployment_handle(MODEL_POOL, app_name=APP_NAME)
    held: dict[str, float] = {}
    deadline = time.monotonic() + patience_s
    while len(held) < replicas and time.monotonic() < deadline:
        stats = handle.stats.remote().result(timeout_s=60)
        caches = stats["vision_cache"].values()
        held[f"{APP_NAME}#{MODEL_POOL}#{stats['replica']}"] = sum(cache["bytes_held"] for cache in caches) / 1e6
    return held


def _start_tracing(actor) -> None:
    """Runs inside the ingress: trace Python allocations from now, against a first snapshot."""
    import tracemalloc

    tracemalloc.start(8)
    actor.soak_snapshot = tracemalloc.take_snapshot()


def _traced_growth(actor) -> str:
    """Runs inside the ingress: the traced Python memory's growth since `_start_tracing`, and its top sources."""
    import tracemalloc

    snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
    differences = snapshot.compare_to(actor.soak_snapshot, "traceback")
    grown = sum(difference.size_diff for difference in differences)
    lines = [f"Python allocations traced in the ingress grew {grown / 1e6:+.1f} MB; where most:"]
    for difference in differences[:12]:
        recent_first = reversed(difference.traceback[-4:])  # a traceback runs from the oldest frame
        frames = " <- ".join(f"{Path(frame.filename).name}:{frame.lineno}" for frame in recent_first)
        lines.append(f"- {difference.size_diff / 1e6:+.2f} MB in {difference.count_diff:+d} blocks: {frames}")
    return "\n".join(lines)


def cache_hit_rate(replicas: int) -> str:
    """The share of vision-cache lookups that hit, over every model replica, once the load has stopped.

    Stats calls carry no image, so the router spreads them by queue length: idle replicas all answer.
    """
    try:
        stats = replica_stats(replicas, MODEL_POOL)
    except TimeoutError as error:
        return f"not read ({error})"
    counts = [cache for replica in stats.values() for cache in replica["vision_cache"].values()]
    lookups = sum(cache["hits"] + cache["misses"] for cache in counts)
    held_mb = sum(cache["bytes_held"] for cache in counts) / 1e6
    return f"{sum(cache['hits'] for cache in counts) / lookups:.1%} of {lookups} lookups hit; the caches hold {held_mb:.0f} MB"


def is_flat(start_mb: float, end_mb: float, cache_growth_mb: float = 0.0) -> bool:
    """Grown by no more than the bound, beyond what the replica's vision-feature cache filled meanwhile."""
    return end_mb - start_mb - max(cache_growth_mb, 0.0) <= max(FLAT_GROWTH_MB, FLAT_GROWTH_SHARE * start_mb)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--sessions", type=int, default=4, help="interactive users at once")
    parser.add_argument("--http", type=int, default=8, help="callers of single HTTP requests at once")
    parser.add_argument("--bad-share", type=float, default=0.1, help="share of the single requests that are bad")
    parser.add_argument("--job-images", type=int, default=48, help="images in each run of the Ray job (0: no job)")
    parser.add_argument("--model-replicas", type=int, default=2)
    parser.add_argument("--checkpoint")
    parser.add_argument("--warmup-s", type=float, default=60, help="load before the start memory reading")
    parser.add_argument(
        "--trace-ingress", action="store_true", help="trace the ingress's Python allocations (tracemalloc) from the start"
    )
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="sam3-soak-"))
    checkpoint = args.checkpoint or str(build_tiny_checkpoint(workdir / "tiny-112", image_size=112))
    if not args.checkpoint:
        print("tiny random-weight checkpoint: its masks are meaningless; this measures the service, not SAM 3")
    ray_address = start_local_ray()
    try:
        config = cpu_config(checkpoint, free_port())
        fixed = {"min_replicas": args.model_replicas, "max_replicas": args.model_replicas}
        deployment(config, MODEL_POOL)["autoscaling_config"].update(fixed)
        url = serve_run(config, workdir / "config.yaml", ray_address)
        rng = np.random.default_rng(0)
        images = [SoakImage.random(rng) for _ in range(16)]
        image_dir = workdir / "job-images"
        image_dir.mkdir()
        for index in range(args.job_images):
            (image_dir / f"{index:04d}.jpg").write_bytes(base64.b64decode(SoakImage.random(rng).base64))
        tallies = {"interactive": KindTally(), "http": KindTally(), "job": KindTally()}
        memory_idle = replica_memory_mb()
        stop = threading.Event()
        tasks: list[Callable[[], None]] = [
            *(lambda seed=seed: interactive_session(tallies["interactive"], url, seed, stop) for seed in range(args.sessions)),
            *(lambda seed=seed: http_caller(tallies["http"], url, images, args.bad_share, 1000 + seed, stop) for seed in range(args.http)),
        ]  # fmt: skip
        if args.job_images:
            tasks.append(lambda: job_runs(tallies["job"], ray_address, image_dir, workdir, stop))
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=len(tasks)) as threads:
            running = [threads.submit(task) for task in tasks]
            try:
                warmup_s = min(args.warmup_s, args.minutes * 30)
                time.sleep(warmup_s)
                memory_start = replica_memory_mb()
                cache_start = cache_mb_by_replica(args.model_replicas)
                if args.trace_ingress:
                    ray.get(ingress_actor().__ray_call__.remote(_start_tracing))
                time.sleep(args.minutes * 60 - warmup_s)
            finally:
                stop.set()  # also when this thread failed: the workers stop instead of running on
            for task in running:
                task.result()  # a soak worker that crashed is a bug of the soak: let it show
        elapsed = time.monotonic() - started
        memory_end = replica_memory_mb()
        cache_end = cache_mb_by_replica(args.model_replicas)
        cache_growth = {name: cache_end[name] - cache_start[name] for name in cache_start.keys() & cache_end.keys()}
        memory = (memory_idle, memory_start, memory_end, cache_growth)
        failed = report(tallies, args, elapsed, cache_hit_rate(args.model_replicas), *memory)
        if args.trace_ingress:
            print("\n" + ray.get(ingress_actor().__ray_call__.remote(_traced_growth)))
    finally:
        serve.shutdown()
        ray.shutdown()
    sys.exit(1 if failed else 0)


def percentile_ms(latencies_s: list[float], q: float) -> str:
    return f"{np.percentile(np.array(latencies_s) * 1000, q):.0f}" if latencies_s else "-"


def report(tallies: dict[str, KindTally], args, elapsed: float, hit_rate: str, memory_idle: dict, memory_start: dict,
           memory_end: dict, cache_growth: dict) -> bool:  # fmt: skip
    """Print the Markdown tables; True when something was lost or unexpected, or memory was not flat."""
    print(f"\nSoak of {elapsed / 60:.1f} min on {cpu_name()} (commit {git_commit()}): `python -m benchmarks.soak "
          f"--minutes {args.minutes:g} --sessions {args.sessions} --http {args.http} --bad-share {args.bad_share:g} "
          f"--job-images {args.job_images} --model-replicas {args.model_replicas}`\n")  # fmt: skip
    print("| kind | requests | answers by status and code | lost | unexpected | p50 ms | p99 ms | cache hits |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, tally in tallies.items():
        answers = ", ".join(f"{outcome}: {count}" for outcome, count in sorted(tally.answers.items()))
        unexpected = ", ".join(f"{what}: {count}" for what, count in tally.unexpected.items()) or "0"
        lookups = sum(tally.cache_lookups.values())
        hits = f"{tally.cache_lookups['hit'] / lookups:.1%} of follow-ups" if lookups else "-"
        if kind == "job":
            hits, unit = f"{len(tally.latencies_s)} runs", "s per run"
            p50, p99 = (f"{np.percentile(tally.latencies_s, q):.0f} {unit}" if tally.latencies_s else "-" for q in (50, 99))
        else:
            p50, p99 = percentile_ms(tally.latencies_s, 50), percentile_ms(tally.latencies_s, 99)
        print(f"| {kind} | {sum(tally.answers.values()) + tally.lost} | {answers} | {tally.lost} | {unexpected} | {p50} | {p99} | {hits} |")
    print(f"\nVision-feature cache, all model replicas: {hit_rate}.\n")
    bound = f"{FLAT_GROWTH_MB:.0f} MB or {FLAT_GROWTH_SHARE:.0%}"
    print(f"| replica | idle MB | start MB (after {args.warmup_s:.0f} s of load) | end MB | growth | of it, cache filled "
          f"| flat (the rest <= {bound}) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    not_flat = 0
    for name in sorted(memory_start):
        if name not in memory_end:
            print(f"| {name} | {memory_idle.get(name, float('nan')):.0f} | {memory_start[name]:.0f} | replaced | | | no |")
            not_flat += 1
            continue
        flat = is_flat(memory_start[name], memory_end[name], cache_growth.get(name, 0.0))
        not_flat += not flat
        cache = f"{cache_growth[name]:+.0f}" if name in cache_growth and MODEL_POOL in name else "-"
        print(f"| {name} | {memory_idle.get(name, float('nan')):.0f} | {memory_start[name]:.0f} | {memory_end[name]:.0f} "
              f"| {memory_end[name] - memory_start[name]:+.0f} | {cache} | {'yes' if flat else 'NO'} |")  # fmt: skip
    lost = sum(tally.lost for tally in tallies.values())
    unexpected = sum(sum(tally.unexpected.values()) for tally in tallies.values())
    print(f"\nlost: {lost}, unexpected: {unexpected}, replicas not flat: {not_flat}")
    return bool(lost or unexpected or not_flat)


if __name__ == "__main__":
    main()
