"""The batch job's engines side by side on the same generated images: throughput and peak memory per process kind.

    python -m benchmarks.pipeline_throughput [--images 300] [--only actors,service,loop,run_many]
    python -m benchmarks.pipeline_throughput --sizes 1000,20000 [--engine actors|service]

Default: the same random PNGs (--image-size 64x80, height x width) and one text prompt through
  actors    `run_job(--via actors)` from this process as the driver: a Ray Data actor pool running
            `Sam3Pipeline.answer` (its wall time includes starting the pool and loading the model);
  service   the application's CPU profile started with `serve run` in the same Ray instance, then
            `run_job(--via service)`: Ray Data actors calling it through `Sam3HandleClient.segment_many`;
  loop      `Sam3HandleClient.run_with_detections` on each image, one at a time (what users had before);
  run_many  `Sam3HandleClient.run_many_with_detections` at --concurrency 8.
Both engines read the same application args (the CPU profile: torch on every core). Every run gets rows,
wall seconds, images/s, the peak resident memory of the driver (this process), of the Ray Data workers
and of the Serve replicas, and the CPU seconds each kind used (where the time goes).

--sizes: memory flatness. One engine at several dataset sizes (--image-size 32x40 by default, to stay
fast); each size's images are written once into a temp dir and each run writes into a fresh one. Peak
memory should not grow with the number of rows.

Memory is sampled every 0.2 s on a thread, over this process and its descendants only (the Ray instance
it starts; other Ray instances on a shared machine are not counted). The tiny random-weight checkpoint
(112 px) is built in a child process, with the images, so torch never loads here and the driver's memory
is a job driver's. Its masks are meaningless; its compute is far below the real model's, so these runs
weigh the pipeline's own overhead more than a real one would.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import re
import shlex
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import ray  # before psutil: Ray puts its own copy of psutil (ray/thirdparty_files) on the path
import psutil
import yaml
from ray import serve

from benchmarks.machine import cpu_name, git_commit
from client import Sam3HandleClient
from client.errors import Sam3Error
from pipelines.config import JobConfig
from pipelines.output import summarize
from pipelines.segment import run_job
from tools.launch import APP_NAME, cpu_config, free_port, serve_run, start_local_ray

ENGINES = ("actors", "service", "loop", "run_many")
KINDS = ("driver", "Ray Data workers", "Serve replicas", "other Ray processes")
SAMPLE_INTERVAL_S = 0.2
OTHER_SHOWN = 4
DISTINCT_IMAGES = 256
CLIENT_TIMEOUT_S = 300.0
MB = 1_000_000


# ---------------------------------------------------------------- inputs, made in a child process


def prepare_inputs(workdir: Path, counts: list[int], height: int, width: int) -> tuple[Path, dict[int, Path]]:
    """The tiny checkpoint and a directory of `count` PNGs per count, made in a spawned child process:
    building the checkpoint imports torch, which would otherwise sit in the driver's memory."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
        return child.submit(_prepare_inputs, workdir, counts, height, width).result()


def _prepare_inputs(workdir: Path, counts: list[int], height: int, width: int) -> tuple[Path, dict[int, Path]]:
    from tests.conftest import tiny_checkpoint_dir

    directories = {count: write_images(workdir / f"images-{count}", count, height, width) for count in set(counts)}
    return tiny_checkpoint_dir(112), directories


def write_images(directory: Path, count: int, height: int, width: int) -> Path:
    """`count` PNG files; up to DISTINCT_IMAGES different pictures, repeated, so 20000 files stay quick to write."""
    import io

    from PIL import Image

    from tests.conftest import random_image

    directory.mkdir(parents=True)
    encoded = []
    for seed in range(min(count, DISTINCT_IMAGES)):
        buffer = io.BytesIO()
        Image.fromarray(random_image(height, width, seed=seed)).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    for index in range(count):
        (directory / f"image{index:06}.png").write_bytes(encoded[index % len(encoded)])
    return directory


# ---------------------------------------------------------------- memory and CPU sampling


def process_kind(title: str) -> str:
    """Ray sets each worker's process title (`ray::MapWorker(MapBatches(...))`, `ray::ServeReplica:...`)."""
    if title.startswith("ray::MapWorker") or "MapBatches" in title:
        return "Ray Data workers"
    if "ServeReplica" in title:
        return "Serve replicas"
    return "other Ray processes"


class Sampler:
    """Peak RSS and CPU seconds by process kind, of this process and its descendants, sampled on a thread.

    Only descendants: the Ray instance this process started is ours, another one on the machine is not.
    A process that exits between samples loses at most one interval of CPU time.
    """

    def __init__(self, interval_s: float = SAMPLE_INTERVAL_S):
        self.interval_s = interval_s
        self.me = psutil.Process()
        self.peak_rss = dict.fromkeys(KINDS, 0)
        self.seen: dict[str, set[int]] = {kind: set() for kind in KINDS}
        self.kind_of: dict[int, str] = {}
        self.title_of: dict[int, str] = {}
        self.cpu_first: dict[int, float] = {}
        self.cpu_last: dict[int, float] = {}
        self.init_since: dict[int, float] = {}
        self.init_s: dict[int, float] = {}
        self._stop = threading.Event()

    def __enter__(self) -> Sampler:
        self.started = time.time()
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        for process in [self.me, *self.me.children(recursive=True)]:
            try:
                with process.oneshot():
                    title = " ".join(process.cmdline()).strip()  # Ray pads the title it sets with spaces
                    rss = process.memory_info().rss
                    cpu = sum(process.cpu_times()[:2])
                    created = process.create_time()
            except psutil.Error:  # exited, or a zombie, since the listing
                continue
            kind = "driver" if process.pid == self.me.pid else process_kind(title)
            self.kind_of[process.pid] = kind  # an idle Ray worker becomes a MapWorker or a replica: the latest wins
            self.title_of[process.pid] = title
            if kind == "Ray Data workers":
                self._time_constructor(process.pid, title)
            self.seen[kind].add(process.pid)
            self.peak_rss[kind] = max(self.peak_rss[kind], rss)
            self.cpu_first.setdefault(process.pid, 0.0 if created >= self.started else cpu)
            self.cpu_last[process.pid] = cpu

    def _time_constructor(self, pid: int, title: str) -> None:
        """Ray shows the running method in the title (`....__init__`, then `....submit`): the constructor's
        time (--via actors: importing torch and loading the model) is how long `__init__` stayed there."""
        now = time.time()
        if title.endswith(".__init__"):
            self.init_since.setdefault(pid, now)
        elif pid in self.init_since:
            self.init_s.setdefault(pid, now - self.init_since[pid])

    def processes(self, kind: str) -> int:
        return sum(1 for pid in self.seen[kind] if self.kind_of[pid] == kind)

    def cpu_s(self, kind: str) -> float:
        return sum(self.cpu_last[pid] - self.cpu_first[pid] for pid, of in self.kind_of.items() if of == kind)

    def cpu_s_by_name(self, kind: str) -> dict[str, float]:
        """CPU seconds of one kind's processes by `short_name`, most first."""
        by_name: dict[str, float] = {}
        for pid, of in self.kind_of.items():
            if of == kind:
                name = short_name(self.title_of[pid])
                by_name[name] = by_name.get(name, 0.0) + self.cpu_last[pid] - self.cpu_first[pid]
        return dict(sorted(by_name.items(), key=lambda item: -item[1]))


def short_name(title: str) -> str:
    """A replica's deployment, a Ray worker's actor or task name, or another process's program or script."""
    first = title.split()[0] if title else "?"
    if first.startswith("ray::ServeReplica:"):  # ray::ServeReplica:APP:DEPLOYMENT
        return first.split(".")[0].split(":")[-1]
    if first.startswith("ray::"):  # ray::MapWorker(MapBatches(...)).submit, ray::StreamingRepartition[...]
        return re.split(r"[(\[.]", first[len("ray::"):])[0]
    return Path(next((token for token in title.split() if token.endswith(".py")), first)).name


def ray_data_workers_alive() -> bool:
    for process in psutil.Process().children(recursive=True):
        try:
            if process_kind(" ".join(process.cmdline()).strip()) == "Ray Data workers":
                return True
        except psutil.Error:
            continue
    return False


def wait_for_ray_data_workers_to_exit(timeout_s: float = 60) -> None:
    """Ray Data ends a job's actors a few seconds after the job returns: the next run must not count them."""
    deadline = time.monotonic() + timeout_s
    while ray_data_workers_alive() and time.monotonic() < deadline:
        time.sleep(0.5)


# ---------------------------------------------------------------- runs


@dataclass
class Run:
    name: str
    rows: int
    errors: int
    wall_s: float
    peak_rss_mb: dict[str, float]
    processes: dict[str, int]
    cpu_s: dict[str, float]
    replica_cpu_s: dict[str, float]
    other_cpu_s: dict[str, float]
    constructor_s: float | None
    note: str = ""

    @property
    def images_per_s(self) -> float:
        return self.rows / self.wall_s


@dataclass
class Setup:
    """What every run shares: the options, the CPU profile's config file, the work directory, Ray's address."""

    args: argparse.Namespace
    config_path: Path
    workdir: Path
    ray_address: str
    service_start_s: float | None = None


def rows_per_call(via: str) -> int:
    return JobConfig(input="-", output="-", via=via, text="-").rows_per_call


def measured(name: str, work) -> tuple[Sampler, float, object]:
    """`work()` under the sampler; wall seconds around the whole call."""
    print(f"measuring {name}", file=sys.stderr, flush=True)
    with Sampler() as sampler:
        started = time.perf_counter()
        result = work()
        wall_s = time.perf_counter() - started
    return sampler, wall_s, result


def to_run(name: str, sampler: Sampler, wall_s: float, rows: int, errors: int, note: str = "") -> Run:
    return Run(
        name,
        rows,
        errors,
        wall_s,
        peak_rss_mb={kind: sampler.peak_rss[kind] / MB for kind in KINDS},
        processes={kind: sampler.processes(kind) for kind in KINDS},
        cpu_s={kind: sampler.cpu_s(kind) for kind in KINDS},
        replica_cpu_s=sampler.cpu_s_by_name("Serve replicas"),
        other_cpu_s=sampler.cpu_s_by_name("other Ray processes"),
        constructor_s=max(sampler.init_s.values(), default=None),
        note=note,
    )


def run_job_measured(name: str, setup: Setup, images: Path, via: str) -> Run:
    """`run_job` into a fresh output directory, as `python -m pipelines.segment` runs it."""
    output = Path(tempfile.mkdtemp(prefix="out-", dir=setup.workdir))
    config = JobConfig(
        input=str(images),
        output=str(output),
        via=via,
        text=setup.args.text,
        config=setup.config_path,
        app_name=APP_NAME,
        workers=setup.args.workers,
        batch_size=setup.args.batch_size,
    )
    sampler, wall_s, line = measured(name, lambda: run_job(config))
    wait_for_ray_data_workers_to_exit()
    summary = summarize(str(output))
    shutil.rmtree(output, ignore_errors=True)  # 20000 rows of masks need not stay on disk
    return to_run(name, sampler, wall_s, summary.rows, summary.rows - summary.succeeded, note=line)


def loop_measured(name: str, client: Sam3HandleClient, paths: list[str], text: str) -> Run:
    """One `run_with_detections` at a time, each result dropped as a user's loop would after using it."""

    def loop() -> int:
        errors = 0
        for path in paths:
            try:
                client.run_with_detections(path, text=text)
            except Sam3Error:
                errors += 1
        return errors

    sampler, wall_s, errors = measured(name, loop)
    return to_run(name, sampler, wall_s, len(paths) - errors, errors)


def run_many_measured(name: str, client: Sam3HandleClient, paths: list[str], text: str, concurrency: int) -> Run:
    """`run_many_with_detections`: the same work as the loop, in flight together; it returns every result at once."""

    def run_many() -> int:
        results = client.run_many_with_detections(paths, text=text, concurrency=concurrency)
        return sum(isinstance(result, Sam3Error) for result in results)

    sampler, wall_s, errors = measured(name, run_many)
    return to_run(name, sampler, wall_s, len(paths) - errors, errors)


def warm_up_ray_data() -> None:
    """Ray Data starts its helper actors (stats, autoscaling coordinator) on a driver's first dataset: once,
    before any run, so the first run measured does not pay for them alone."""
    ray.data.range(8).map_batches(lambda batch: batch).materialize()


def start_service(setup: Setup) -> None:
    """The CPU profile with `serve run`, as the tests start it; waits until it answers."""
    print("starting the application (serve run, CPU profile)", file=sys.stderr, flush=True)
    config = yaml.safe_load(setup.config_path.read_text())
    started = time.perf_counter()
    serve_run(config, setup.workdir / "serve-run.yaml", setup.ray_address)
    setup.service_start_s = time.perf_counter() - started


def measure_engines(setup: Setup, images: Path) -> list[Run]:
    """Each engine in --only, in order, on the same images; the application starts before the first that needs it."""
    args = setup.args
    runs = []
    if "actors" in args.only:
        runs.append(run_job_measured("job, --via actors", setup, images, "actors"))
    if {"service", "loop", "run_many"} & set(args.only):
        start_service(setup)
    if "service" in args.only:
        runs.append(run_job_measured("job, --via service", setup, images, "service"))
    paths = [str(path) for path in sorted(images.glob("*.png"))]
    client = Sam3HandleClient(APP_NAME, timeout=CLIENT_TIMEOUT_S)
    if {"loop", "run_many"} & set(args.only):
        client.run_with_detections(paths[0], text=args.text)  # look the handle up before timing
    if "loop" in args.only:
        runs.append(loop_measured("loop of run_with_detections, one at a time", client, paths, args.text))
    if "run_many" in args.only:
        name = f"run_many_with_detections, concurrency {args.concurrency}"
        runs.append(run_many_measured(name, client, paths, args.text, args.concurrency))
    return runs


def measure_sizes(setup: Setup, images: dict[int, Path]) -> list[Run]:
    """One engine at each size, in the given order, each into a fresh output directory."""
    if setup.args.engine == "service":
        start_service(setup)
    return [
        run_job_measured(f"{size} images, --via {setup.args.engine}", setup, images[size], setup.args.engine)
        for size in setup.args.sizes
    ]


# ---------------------------------------------------------------- report


def print_header(args: argparse.Namespace, checkpoint: Path, load_before: tuple[float, ...]) -> None:
    print(f"# benchmarks.pipeline_throughput, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, commit {git_commit()}")
    print()
    print("```")
    print("python -m benchmarks.pipeline_throughput " + shlex.join(sys.argv[1:]))
    print("```")
    print()
    load = ", ".join(f"{value:.2f}" for value in load_before)
    print(f"- machine: {os.cpu_count()} CPUs ({cpu_name()}), no GPU used; load average before the run {load}")
    print(f"- versions: python {platform.python_version()}, ray {ray.__version__}")
    print(f"- checkpoint: the tiny random-weight one (112 px), {checkpoint}: **its masks are meaningless**")
    height, width = args.image_size
    print(
        f"- inputs: random PNGs {height}x{width} (height x width), text prompt {args.text!r}; job: --workers "
        f"{args.workers}, --max-in-flight {JobConfig.model_fields['max_in_flight'].default}, rows per worker call "
        f"(--batch-size) actors {rows_per_call('actors')}, service {rows_per_call('service')}; both engines use the CPU profile's args "
        f"(torch threads = {os.cpu_count()})"
    )
    print(
        f"- memory: peak RSS of the largest one process of each kind (processes of that kind seen), sampled every "
        f"{SAMPLE_INTERVAL_S} s; RSS counts the pages of Ray's shared-memory object store a process touched, so "
        "object-store data can count in several processes at once. The driver is this process (its sampler too)."
    )
    print()


def print_table(title: str, headers: list[str], rows: list[list[str]]) -> None:
    print(f"### {title}")
    print()
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---" if index == 0 else "---:" for index in range(len(headers))) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()


def memory_cell(run: Run, kind: str) -> str:
    count = run.processes[kind]
    return "-" if count == 0 else f"{run.peak_rss_mb[kind]:.0f} ({count})"


def print_runs(title: str, runs: list[Run]) -> None:
    """Throughput and peak memory, then CPU seconds by kind: where each run's time went."""
    headers = ["run", "rows", "errors", "wall s", "images/s"]
    headers += ["driver MB", "Ray Data worker MB (n)", "Serve replica MB (n)"]
    table = [
        [run.name, str(run.rows), str(run.errors), f"{run.wall_s:.1f}", f"{run.images_per_s:.1f}",
         f"{run.peak_rss_mb['driver']:.0f}", memory_cell(run, "Ray Data workers"), memory_cell(run, "Serve replicas")]
        for run in runs
    ]  # fmt: skip
    print_table(f"{title}: throughput and peak RSS", headers, table)
    headers = ["run", *(f"{kind} CPU s" for kind in KINDS), "cores busy", "Ray Data actor constructor s"]
    table = [
        [run.name, *(f"{run.cpu_s[kind]:.1f}" for kind in KINDS), f"{sum(run.cpu_s.values()) / run.wall_s:.2f}",
         "-" if run.constructor_s is None else f"{run.constructor_s:.1f}"]
        for run in runs
    ]  # fmt: skip
    print_table(f"{title}: CPU seconds by process kind", headers, table)


def seconds_list(items: list[tuple[str, float]]) -> str:
    return ", ".join(f"{name} {seconds:.1f}" for name, seconds in items)


def print_notes(runs: list[Run], setup: Setup, elapsed_s: float) -> None:
    """The job's own summary lines, the replicas' CPU by deployment, and what the wall times include."""
    print("Notes:")
    print()
    for run in runs:
        details = []
        if run.note:  # "run-ID: 60 rows in 12.3 s (4.9 images/s), 60 ok, errors: none; skipped ..."
            details.append(f"job summary `{run.note.split(': ', 1)[1].split('; ', 1)[0]}`")
        if run.replica_cpu_s:
            details.append(f"Serve replica CPU s by deployment: {seconds_list(sorted(run.replica_cpu_s.items()))}")
        busiest = list(run.other_cpu_s.items())[:OTHER_SHOWN]
        details.append(f"other Ray processes' CPU s, busiest: {seconds_list(busiest)}")
        print(f"- {run.name}: {'; '.join(details)}")
    if len(runs) > 1 and setup.args.sizes:
        first, last = runs[0], runs[-1]
        extra_s = last.wall_s - first.wall_s
        marginal = f"{(last.rows - first.rows) / extra_s:.1f}" if extra_s > 0 else "-"
        print(f"- from {first.rows} to {last.rows} rows: {marginal} images/s for the extra rows (start-up left out)")
    if setup.service_start_s is not None:
        print(f"- the application took {setup.service_start_s:.0f} s to start (`serve run` until healthy), not counted")
    print(
        "- a job's wall time is the whole `run_job` call: listing, starting its actor pool (--via actors: importing "
        "torch and loading the model, the constructor column), segmenting, writing Parquet"
    )
    print("- the tiny checkpoint's masks are meaningless (random weights); its compute is far below the real model's")
    print(f"- whole benchmark: {elapsed_s:.0f} s, making the inputs and starting Ray included")
    print()


# ---------------------------------------------------------------- main


def size_arg(value: str) -> tuple[int, int]:
    height, width = (int(part) for part in value.lower().split("x"))
    return height, width


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300, help="images in the side-by-side run")
    parser.add_argument("--only", default=",".join(ENGINES), help=f"side-by-side runs, from {','.join(ENGINES)}")
    parser.add_argument("--sizes", help="memory flatness: dataset sizes, comma-separated (e.g. 1000,20000)")
    parser.add_argument("--engine", choices=("actors", "service"), default="actors", help="the engine for --sizes")
    parser.add_argument("--image-size", type=size_arg, help="HEIGHTxWIDTH (default 64x80; 32x40 with --sizes)")
    parser.add_argument("--text", default="cat", help="the text prompt")
    parser.add_argument("--workers", type=int, default=1, help="the job's --workers (callers or model actors)")
    parser.add_argument("--concurrency", type=int, default=8, help="run_many's concurrency")
    parser.add_argument("--batch-size", type=int, help="the job's --batch-size (rows per worker call)")
    args = parser.parse_args()
    args.only = args.only.split(",")
    unknown = set(args.only) - set(ENGINES)
    if unknown:
        parser.error(f"unknown runs {sorted(unknown)}; choose from {','.join(ENGINES)}")
    args.sizes = [int(size) for size in args.sizes.split(",")] if args.sizes else None
    args.image_size = args.image_size or ((32, 40) if args.sizes else (64, 80))
    return args


def main() -> None:
    args = parse_args()
    started = time.monotonic()
    load_before = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="sam3-pipeline-throughput-"))
    try:
        print("building the checkpoint and writing the images", file=sys.stderr, flush=True)
        checkpoint, images = prepare_inputs(workdir, args.sizes or [args.images], *args.image_size)
        ray_address = start_local_ray()
        ray.data.DataContext.get_current().enable_progress_bars = False
        warm_up_ray_data()
        try:
            config_path = workdir / "sam3-cpu.yaml"  # the actors engine reads its args from it, as the job does
            config_path.write_text(yaml.safe_dump(cpu_config(str(checkpoint), free_port()), sort_keys=False))
            setup = Setup(args, config_path, workdir, ray_address)
            runs = measure_sizes(setup, images) if args.sizes else measure_engines(setup, images[args.images])
        finally:
            serve.shutdown()
            ray.shutdown()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print_header(args, checkpoint, load_before)
    if args.sizes:
        print_runs(f"Memory flatness, --via {args.engine}, by dataset size", runs)
    else:
        print_runs(f"{args.images} images, side by side", runs)
    print_notes(runs, setup, time.monotonic() - started)


if __name__ == "__main__":
    main()
