"""Side by side in one run: transformers, our core, the application over HTTP and the handle, and Serve's floor.

    python -m benchmarks.compare [--preset tiny|mid|full | --checkpoint DIR] [--device cpu|cuda]
        [--dtype auto|float32|bfloat16] [--images 48] [--score-threshold T] [--max-instances K] [--requests 16]
        [--concurrency 1,8,32] [--autoscale-load-s 60] [--only inprocess,prompts,bytes,http,handle,floor]
        [--configurations batched,unbatched,autoscaling,cache-hits] [--max-batch-size 8,16]
        [--compile auto|on|off] [--compile-regions vision,...] [--markdown]

Each request sends the next of `--images` distinct 640x480 JPEG photos (crops of scikit-image's photos, as files
and as their pixels in numpy arrays) with the same text prompt, and every model runs in `--dtype` (auto:
bfloat16 on cuda, float32 on cpu), our core and the model pool with their layers compiled as `--compile` says
(auto: on cuda, as the application's own `compile: auto`):
  inprocess  transformers' own pipeline one image at a time (what a user writes: `Sam3Model` + `Sam3Processor`,
             `post_process_instance_segmentation`), and our core (`Sam3Pipeline.segment`), each in this process;
  prompts    our core in this process with one text and with four on the same photo (one vision pass),
             each with texts new to it on every call and with texts it has seen (cached encodings);
  bytes      the bytes one request puts on each hop of the application, made by the stages' own functions in
             this process (`hop_bytes`);
  http       the application through `Sam3HttpClient.run` at each concurrency (threads), batching on and off;
             then at the highest concurrency with autoscaling on; then one row of cache hits
             (`--configurations` chooses among these four);
  handle     the same through `Sam3HandleClient.run`, from this driver process;
  floor      a bare Serve application of the same shape (HTTP -> ingress -> three chained handle calls, no
             work), with small payloads and with a 3 MB and a 6 MB array between stages, and an HTTP echo.
The application starts as the tests start it (`cpu_config` + `serve run` on a fresh local Ray; serve_config.yaml
on cuda) in the same dtype, with its vision-feature cache off, so no request is answered from another's
features, and each autoscaled deployment held at its minimum replica count, so figures do not depend on how
long a configuration runs. Two rows say otherwise in their names: 'autoscaling on' (after `--autoscale-load-s`
of untimed load, so autoscaling can act) and 'cache hits' (one photo again and again, the cache on, the
client sending the photo's id). Every row gives the mean instances per answer (`--score-threshold` and
`--max-instances` set them: random weights keep about 146 of the full preset's 200 queries at 0.5, real
weights a handful), and on cuda the GPU's mean utilization (nvidia-smi every 0.5 s).
Random-weight checkpoints cost the same compute as real ones; their masks are meaningless.
"""

import argparse
import gc
import itertools
import os
import pickle
import platform
import shutil
import subprocess
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import httpx
import numpy as np
import ray
import torch
import transformers
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import Response
from PIL import Image
from ray import serve
from skimage import data
from transformers import Sam3Model, Sam3Processor

from benchmarks.machine import cpu_name, git_commit
from client import Sam3HandleClient, Sam3HttpClient, SegmentRequest, SegmentResponse
from client.errors import Sam3Error
from client.images import encode_image
from client.rle import decode_mask
from deployments.config import AppArgs, set_default_checkpoint
from sam3_serve_core.checkpoint import Sam3Models, load_sam3, resolve_dtype
from sam3_serve_core.compilation import DEFAULT_REGIONS, REGIONS
from sam3_serve_core.messages import ModelResult
from sam3_serve_core.pipeline import Sam3Pipeline, prepare_request
from sam3_serve_core.pipeline import warm_up as warm_up_model
from sam3_serve_core.postprocess import encode_segmentation, to_response
from sam3_serve_core.runner import Sam3Runner
from tools import tiny_checkpoint
from tools.launch import APP_NAME, REPO, SERVE_CONFIG, cpu_config, free_port, serve_run, start_local_ray

SECTIONS = ("inprocess", "prompts", "bytes", "http", "handle", "floor")
# The application's configurations the http and handle sections run, in this order.
CONFIGURATIONS = ("batched", "unbatched", "autoscaling", "cache-hits")
# scikit-image's colour photos (no download needed); the harness sends 640x480 crops of them.
PHOTOS = (
    "chelsea", "astronaut", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
    "stereo_motorcycle",
)
PHOTO_SIZE = (640, 480)
PROMPT_COUNTS = (1, 4)
PRESETS = ("tiny", "mid", "full")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
APP_DEFAULTS = AppArgs()
DEFAULT_SCORE_THRESHOLD = APP_DEFAULTS.score_threshold  # the service's and transformers' row's, unless given
MODEL_POOL = "Sam3ModelPool"
SCALED_DEPLOYMENTS = ("Sam3Preprocessor", MODEL_POOL, "Sam3Postprocessor")  # replicas shown as pre/model/post
# Untimed load before the row that follows a restart of every replica: new processes are slow at first on 2 cores.
SETTLE_S = 10
# Stages the server reports in `timings_ms`, in data-path order; any other key it sends is shown after them.
SERVER_STAGES = ("preprocess", "queue", "model", "postprocess")
BETWEEN_STAGES = "server between stages (median)"
CLIENT_TIMEOUT_S = 1800.0
IN_PROCESS_WARMUP = 3
STAGE_SAMPLES = 5
FLOOR_REQUESTS = 50
FLOOR_WARMUP = 5
GPU_QUERY = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"]
GPU_SAMPLE_S = 0.5
ECHO_BODY_BYTES = 900_000
ECHO_NAME = f"HTTP echo, {ECHO_BODY_BYTES // 1000} kB body"
FLOOR_CHAINS = {
    "bare chain, small payload": (0, 0),
    "bare chain, 3 MB then 6 MB array between stages": (3_000_000, 6_000_000),
}


@dataclass
class Measurement:
    """One configuration's timed requests; figures the running code cannot give stay None."""

    name: str
    latencies_s: list[float]
    wall_s: float
    errors: int = 0
    key: tuple = ()  # what the targets look a row up by: (kind, input, concurrency, configuration)
    instances: float | None = None  # mean concept instances per answer
    gpu_utilization: float | None = None  # mean over the timed requests, 0 to 1
    gpu_memory_mib: float | None = None  # the most seen in use
    replicas: str | None = None  # running replicas at the end, "pre/model/post"
    mean_batch: float | None = None
    busy_fraction: float | None = None
    stages_ms: dict[str, float] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return len(self.latencies_s) / self.wall_s

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q)) * 1000


# ---------------------------------------------------------------- inputs, checkpoint, header


def write_photos(directory: Path, count: int) -> tuple[list[Path], list[np.ndarray]]:
    """`count` distinct 640x480 JPEG photos: each of `PHOTOS` whole, then crops of them at random scales and offsets.

    Real photos, so each JPEG has a typical size. Returns the files and the pixels the server decodes from them
    (what the numpy-array rows send), so both inputs carry the same images.
    """
    rng = np.random.default_rng(0)
    paths, arrays = [], []
    for index in range(count):
        name = PHOTOS[index % len(PHOTOS)]
        source = getattr(data, name)()
        source = source[0] if isinstance(source, tuple) else source  # stereo_motorcycle: (left, right, disparity)
        height, width = source.shape[:2]
        scale = 1.0 if index < len(PHOTOS) else rng.uniform(0.5, 0.95)
        crop_width = min(width, height * 4 / 3) * scale  # of the largest 4:3 box the photo holds
        crop_height = crop_width * 3 / 4
        left, top = rng.uniform(0, width - crop_width), rng.uniform(0, height - crop_height)
        box = (left, top, left + crop_width, top + crop_height)
        path = directory / f"{index:03d}-{name}-640x480.jpg"
        Image.fromarray(source).resize(PHOTO_SIZE, Image.Resampling.BICUBIC, box=box).save(path, quality=90)
        paths.append(path)
        arrays.append(np.array(Image.open(path).convert("RGB")))
    if len({array.tobytes() for array in arrays}) != count:
        raise RuntimeError("two of the generated photos are the same image")
    return paths, arrays


def preset_checkpoint(preset: str) -> Path:
    """The preset's random-weight checkpoint, built once into .cache/benchmarks."""
    return tiny_checkpoint.cached_checkpoint(REPO / ".cache" / "benchmarks", preset=preset)


def print_header(args, checkpoint: Path, photos: list[Path]) -> None:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    source = f"preset {args.preset}" if args.checkpoint is None else "given directory"
    print(f"# benchmarks.compare, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, commit {git_commit()}")
    threads = torch.get_num_threads()
    print(f"machine: {os.cpu_count()} CPUs ({cpu_name()}), torch threads in this process {threads}, GPU {gpu}")
    print(
        f"versions: python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, ray {ray.__version__}"
    )
    print(f"checkpoint: {source}, {checkpoint} (random weights: masks meaningless, compute as real)")
    jpeg_kb = statistics.fmean(photo.stat().st_size for photo in photos) / 1000
    print(
        f"device {args.device}, dtype {args.dtype}, compile {args.compile} (in process and in the application); images: {len(photos)} "
        f"distinct 640x480 JPEG photos (crops of scikit-image's {', '.join(PHOTOS)}; {jpeg_kb:.0f} kB on average), "
        f"each request the next one, as a path and as a numpy array; text prompt {args.text!r}; {args.requests} "
        f"timed requests per configuration (at least one per thread), after a warm-up"
    )
    most = f"the {args.max_instances} best scoring" if args.max_instances else "all"
    print(f"instances: {most} of those scoring above {args.score_threshold or DEFAULT_SCORE_THRESHOLD}")
    print(
        "the application: each autoscaled deployment pinned at its minimum replicas except in the row named "
        "'autoscaling on'; the vision-feature cache off (vision_cache_bytes: 0) except in the row named "
        "'cache hits', which sends one photo again and again with the cache on"
    )
    print()


# ---------------------------------------------------------------- timing helpers


def median_ms(function: Callable[[], object], repeats: int = STAGE_SAMPLES) -> float:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1000


class GpuSampler:
    """`nvidia-smi` every 0.5 s in a background thread, while the `with` block runs: the GPUs' mean utilization
    and the most memory in use. Without a GPU (or nvidia-smi) it samples nothing and its figures are None."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and shutil.which(GPU_QUERY[0]) is not None
        self.samples: list[tuple[float, float]] = []  # (utilization %, MiB used), over all GPUs
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True, name="gpu-sampler")

    def __enter__(self) -> "GpuSampler":
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        if self.enabled:
            self._thread.join()

    def _sample(self) -> None:
        while True:
            try:
                output = subprocess.run(GPU_QUERY, capture_output=True, text=True, timeout=5, check=True).stdout
                gpus = [[float(value) for value in line.split(",")] for line in output.strip().splitlines()]
                if gpus:
                    self.samples.append((statistics.fmean(u for u, _ in gpus), sum(m for _, m in gpus)))
            except (OSError, subprocess.SubprocessError, ValueError):
                pass  # a sample lost, not the row
            if self._stop.wait(GPU_SAMPLE_S):
                return

    def record(self, row: "Measurement") -> None:
        if self.samples:
            row.gpu_utilization = statistics.fmean(u for u, _ in self.samples) / 100
            row.gpu_memory_mib = max(m for _, m in self.samples)


def cycling(images: list, segment: Callable[[object], int | None]) -> Callable[[], int | None]:
    """A call that segments the next of `images` each time, from the first, round and round (thread-safe)."""
    calls = itertools.count()
    lock = threading.Lock()

    def call() -> int | None:
        with lock:
            index = next(calls) % len(images)
        return segment(images[index])

    return call


def mean_instances(counts: list[int | None]) -> float | None:
    known = [count for count in counts if count is not None]
    return statistics.fmean(known) if known else None


def time_sequential(
    name: str, function: Callable[[], int | None], requests: int, warmup: int, key: tuple = (), gpu: bool = False
) -> Measurement:
    """One call at a time, as a user's loop runs; throughput is calls over the loop's wall time.

    `function` returns the number of instances in its answer (None: unknown); with `gpu`, the GPU is sampled."""
    print(f"measuring {name}", file=sys.stderr)
    for _ in range(warmup):
        function()
    latencies, counts = [], []
    with GpuSampler(gpu) as sampler:
        started = time.perf_counter()
        for _ in range(requests):
            call_started = time.perf_counter()
            counts.append(function())
            latencies.append(time.perf_counter() - call_started)
        wall_s = time.perf_counter() - started
    row = Measurement(name, latencies, wall_s, key=key, instances=mean_instances(counts))
    sampler.record(row)
    return row


def warm_up(function: Callable[[], object], concurrency: int) -> None:
    """One call per thread, all at once: connections, replicas and caches are ready before timing."""
    with ThreadPoolExecutor(max_workers=concurrency) as threads:
        list(threads.map(lambda _: function(), range(concurrency)))


def time_concurrent(
    name: str, function: Callable[[], int | None], requests: int, concurrency: int, key: tuple = (), gpu: bool = False
) -> Measurement:
    """`concurrency` threads calling back to back (closed loop), at least one call per thread."""

    def timed_call(_) -> tuple[float, int | None] | None:
        started = time.perf_counter()
        try:
            count = function()
        except Sam3Error as error:
            print(f"  {name}: {type(error).__name__}: {error}", file=sys.stderr)
            return None
        return time.perf_counter() - started, count

    with ThreadPoolExecutor(max_workers=concurrency) as threads, GpuSampler(gpu) as sampler:
        started = time.perf_counter()
        results = list(threads.map(timed_call, range(max(requests, concurrency))))
        wall_s = time.perf_counter() - started
    answered = [result for result in results if result is not None]
    row = Measurement(
        name,
        [latency for latency, _ in answered],
        wall_s,
        errors=len(results) - len(answered),
        key=key,
        instances=mean_instances([count for _, count in answered]),
    )
    sampler.record(row)
    return row


# ---------------------------------------------------------------- in process


def transformers_segmenter(
    checkpoint: Path, device: str, dtype: str, text: str, threshold: float, max_instances: int | None
) -> Callable[[object], int]:
    """What a transformers user writes: processor -> model -> post_process_instance_segmentation, in `dtype`, then
    the `max_instances` best scoring if given. Returns the number of instances found."""
    processor = Sam3Processor.from_pretrained(checkpoint)
    model = Sam3Model.from_pretrained(checkpoint, dtype=DTYPES[dtype]).to(device).eval()

    @torch.inference_mode()
    def segment(image) -> dict:
        if isinstance(image, Path):
            image = Image.open(image).convert("RGB")
        inputs = processor(images=image, text=text, return_tensors="pt").to(device, dtype=DTYPES[dtype])
        outputs = model(**inputs)
        result = processor.post_process_instance_segmentation(
            outputs, threshold=threshold, mask_threshold=0.5, target_sizes=inputs["original_sizes"].tolist()
        )[0]
        if max_instances is not None:
            best = result["scores"].argsort(descending=True)[:max_instances]
            result = {key: value[best] for key, value in result.items()}
        result = {key: value.cpu() for key, value in result.items()}  # the user's masks, on the host
        return len(result["scores"])

    return segment


def measure_in_process(checkpoint: Path, args, inputs: dict[str, list]) -> list[Measurement]:
    """transformers, then our core, each alone in this process: one's models are freed before the next loads.

    Each row goes through the images from the first, one per call, as the application rows do."""
    threshold = args.score_threshold or DEFAULT_SCORE_THRESHOLD
    segment = transformers_segmenter(checkpoint, args.device, args.dtype, args.text, threshold, args.max_instances)
    rows = []
    for label, images in inputs.items():
        name, key = f"transformers in process, {label}", ("transformers", label)
        rows.append(time_sequential(name, cycling(images, segment), args.requests, IN_PROCESS_WARMUP, key, args.gpu))
    del segment
    models = load_sam3(str(checkpoint), args.device, args.dtype, args.compile, args.compile_regions or DEFAULT_REGIONS)
    pipeline = Sam3Pipeline(models)
    warm_up_model(pipeline.runner)

    def core(image) -> int:
        return len(pipeline.segment(str(image) if isinstance(image, Path) else image, **args.prompt).scores)

    for label, images in inputs.items():
        name, key = f"our core in process, {label}", ("core", label)
        rows.append(time_sequential(name, cycling(images, core), args.requests, IN_PROCESS_WARMUP, key, args.gpu))
    del pipeline
    gc.collect()
    return rows


def measure_prompts(checkpoint: Path, args, photo: Path) -> list[Measurement]:
    """One request with several texts against one with a single text, on the same photo, in this process."""
    pipeline = Sam3Pipeline(load_sam3(str(checkpoint), device=args.device, dtype=args.dtype))
    fresh = itertools.count()
    rows = []
    for count in PROMPT_COUNTS:

        def new_texts(count=count) -> int:
            return len(pipeline.segment(str(photo), text=[f"{args.text} {next(fresh)}" for _ in range(count)]).scores)

        def cached(count=count) -> int:
            return len(pipeline.segment(str(photo), text=[f"{args.text} {index}" for index in range(count)]).scores)

        name = f"our core, {count} text(s), new each call"
        rows.append(time_sequential(name, new_texts, args.requests, IN_PROCESS_WARMUP, ("prompts", count, "new")))
        name = f"our core, {count} text(s), cached"
        rows.append(time_sequential(name, cached, args.requests, IN_PROCESS_WARMUP, ("prompts", count, "cached")))
    del pipeline
    gc.collect()
    return rows


def pickled_bytes(value: object) -> int:
    """What a handle call's argument or result takes on the wire: Ray pickles it with protocol 5."""
    return len(pickle.dumps(value, protocol=5))


def hop_bytes(
    request: SegmentRequest, models: Sam3Models, runner: Sam3Runner
) -> tuple[dict[str, int], SegmentResponse]:
    """The bytes `request` puts on each hop of the application, and its answer, made in this process by the
    functions the stages run: the model pool's `ModelResult` holds the answer with its masks bit-packed, which
    the postprocessor encodes as RLE."""
    item = prepare_request(request, tokenizer=models.tokenizer, geometry=models.geometry)
    result = ModelResult(runner.run([item])[0], dict(item.timings_ms), item.image_key)
    segmentation = encode_segmentation(result.segmentation, APP_DEFAULTS.mask_chunk_pixels)
    response = to_response(segmentation, request.prompt_type, result.timings_ms, image_id=result.image_key)
    return {
        "client -> ingress (HTTP body, JSON)": len(request.model_dump_json().encode()),
        "ingress -> preprocessor (pickled SegmentRequest)": pickled_bytes(request),
        "preprocessor -> model pool (pickled prepared item)": pickled_bytes(item),
        "model pool -> postprocessor (pickled model result)": pickled_bytes(result),
        "postprocessor -> ingress (pickled SegmentResponse)": pickled_bytes(response),
        "ingress -> client (HTTP body, JSON)": len(response.model_dump_json().encode()),
    }, response


def measure_hop_bytes(checkpoint: Path, args, photo: Path) -> tuple[dict[str, dict[str, int]], int]:
    """`hop_bytes` of one representative request, on the first photo, as `run()` and as `run_with_detections()`
    send it; and the instances in its answer."""
    print("counting the bytes per hop", file=sys.stderr)
    models = load_sam3(str(checkpoint), device=args.device, dtype=args.dtype)
    runner = Sam3Runner(models, DEFAULT_SCORE_THRESHOLD, mask_chunk_pixels=APP_DEFAULTS.mask_chunk_pixels)
    image = encode_image(photo, timeout=None)
    by_call = {}
    for call, with_detections in (("run()", False), ("run_with_detections()", True)):
        request = SegmentRequest(
            image=image, **args.prompt, return_detections=with_detections, timeout_s=CLIENT_TIMEOUT_S
        )
        by_call[call], response = hop_bytes(request, models, runner)
    del models, runner
    gc.collect()
    return by_call, len(response.scores)


# ---------------------------------------------------------------- the application


def app_config(
    checkpoint: Path,
    port: int,
    device: str,
    max_batch_size: int | None,
    *,
    dtype: str | None = None,
    vision_cache_bytes: int | None = None,
    autoscaling: bool = False,
    compile: bool | str | None = None,
    compile_regions: list[str] | None = None,
) -> dict:
    """The CPU profile (or serve_config.yaml itself on a GPU), each deployment at its minimum replicas unless
    `autoscaling`. `dtype` and `vision_cache_bytes` (0: the cache off) replace the configured ones; None keeps them.
    `compile` (True, False or "auto") and `compile_regions` likewise."""
    if device == "cpu":
        config = cpu_config(str(checkpoint), port)
    else:
        config = yaml.safe_load(SERVE_CONFIG.read_text())
        set_default_checkpoint(config["applications"][0]["args"], str(checkpoint))
        config["applications"][0]["args"]["device"] = device
        config["http_options"].update(host="127.0.0.1", port=port)
    if dtype is not None:
        config["applications"][0]["args"]["dtype"] = dtype
    if vision_cache_bytes is not None:
        config["applications"][0]["args"]["vision_cache_bytes"] = vision_cache_bytes
    if compile is not None:
        config["applications"][0]["args"]["compile"] = compile
    if compile_regions is not None:
        config["applications"][0]["args"]["compile_regions"] = compile_regions
    for deployment in config["applications"][0]["deployments"]:
        scaling = deployment.get("autoscaling_config")
        if scaling is not None and not autoscaling:  # pinned, not removed: the code's own config would apply
            replicas = max(1, scaling.get("min_replicas", 1))
            scaling.pop("initial_replicas", None)
            scaling.update(min_replicas=replicas, max_replicas=replicas)
        if deployment["name"] == MODEL_POOL and max_batch_size is not None:
            deployment["user_config"] = {**deployment.get("user_config", {}), "max_batch_size": max_batch_size}
    return config


def redeploy(config: dict, path: Path, ray_address: str) -> str:
    """`serve run` a changed config over the running app and wait until the controller has applied it.

    A user_config-only change is applied live, so the app may still read RUNNING from before it.
    """
    deployed_before = serve.status().applications[APP_NAME].last_deployed_time_s
    url = serve_run(config, path, ray_address)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status = serve.status().applications[APP_NAME]
        if status.last_deployed_time_s != deployed_before and status.status == "RUNNING":
            return url
        time.sleep(0.5)
    raise TimeoutError(f"the new configuration of {APP_NAME} was not applied within 120 s: {status}")


def model_pool_stats() -> dict | None:
    """Cumulative batch sizes and busy seconds of the model replica; None when there is not exactly one."""
    replicas = serve.status().applications[APP_NAME].deployments[MODEL_POOL].replica_states.get("RUNNING", 0)
    if replicas != 1:
        return None
    return serve.get_deployment_handle(MODEL_POOL, APP_NAME).stats.remote().result(timeout_s=60)


def batch_and_busy(before: dict | None, after: dict | None, wall_s: float) -> tuple[float | None, float | None]:
    """Mean batch size and busy fraction of the model replica over one configuration's timed requests."""
    if before is None or after is None:
        return None, None
    sizes = Counter({int(k): v for k, v in after["batch_sizes"].items()})
    sizes.subtract({int(k): v for k, v in before["batch_sizes"].items()})
    batches = sum(sizes.values())
    mean_batch = sum(size * count for size, count in sizes.items()) / batches if batches else None
    return mean_batch, (after["busy_s"] - before["busy_s"]) / wall_s


def server_stage_means_ms(responses: list) -> dict[str, float]:
    """The mean of each stage the server reports in `timings_ms`; and the median time a request spent between
    its stages (the server's total less its stages: the hops from deployment to deployment), per request, so
    that one slow stage does not hide in it."""
    samples: dict[str, list[float]] = {}
    between = []
    for response in responses:
        for stage, ms in response.timings_ms.items():
            samples.setdefault(f"server {stage}", []).append(ms)
        if "total" in response.timings_ms:
            between.append(response.timings_ms["total"] - sum(response.timings_ms.get(stage, 0.0) for stage in SERVER_STAGES))
    means = {stage: statistics.fmean(values) for stage, values in samples.items()}
    return {**means, BETWEEN_STAGES: statistics.median(between)} if between else means


def client_decode_ms(responses: list) -> float | None:
    """What `run()` decodes: the union mask, timed on a few of the responses."""
    samples = [median_ms(partial(decode_mask, response.union_mask), 1) for response in responses[:STAGE_SAMPLES]]
    return statistics.median(samples) if samples else None


def instance_counts(images: list[Path], args) -> list[int | None]:
    """The instances in the application's answer for each image, asked once with detections, untimed.

    `run()`'s answers carry the union mask only; an image's count is the same whichever row sends it.
    """
    print("counting the instances in the application's answers", file=sys.stderr)
    client = Sam3HandleClient(APP_NAME, timeout=CLIENT_TIMEOUT_S, reuse_images=False)
    answers = client.run_many_with_detections(images, **args.prompt, concurrency=max(args.concurrency))
    return [None if isinstance(answer, Sam3Error) else len(answer["scores"]) for answer in answers]


def load_for(seconds: float, call: Callable[[], object], concurrency: int) -> None:
    """`concurrency` threads calling back to back for `seconds`, untimed: time for autoscaling to act."""
    deadline = time.monotonic() + seconds

    def loop(_) -> None:
        while time.monotonic() < deadline:
            try:
                call()
            except Sam3Error as error:
                print(f"  under load: {type(error).__name__}: {error}", file=sys.stderr)

    with ThreadPoolExecutor(max_workers=concurrency) as threads:
        list(threads.map(loop, range(concurrency)))


def running_replicas() -> str:
    """The replicas of the preprocessor, the model pool and the postprocessor, as "pre/model/post": those running,
    and "+N" for those starting."""
    deployments = serve.status().applications[APP_NAME].deployments
    counts = []
    for name in SCALED_DEPLOYMENTS:
        states = deployments[name].replica_states
        starting = sum(states.get(state, 0) for state in ("STARTING", "UPDATING", "RECOVERING"))
        counts.append(f"{states.get('RUNNING', 0)}" + (f"+{starting}" if starting else ""))
    return "/".join(counts)


def measure_client(
    name: str,
    key: tuple,
    client,
    responses: list,
    images: list,
    counts: list,
    args,
    concurrency: int,
    load_s: float = 0,
) -> Measurement:
    """`client.run` under load, one image after the other, with the model replica's stats around it and the
    stage times and replica counts after it. `counts` are the images' instances (`instance_counts`); `load_s`
    seconds of untimed load come first."""
    print(f"measuring {name}", file=sys.stderr)

    def segment(index: int) -> int | None:
        client.run(images[index], **args.prompt)
        return counts[index]

    indices = list(range(len(images)))
    load_for(load_s, cycling(indices, segment), concurrency)
    warm_up(cycling(indices, segment), concurrency)
    responses.clear()
    stats_before = model_pool_stats()
    measurement = time_concurrent(name, cycling(indices, segment), args.requests, concurrency, key, args.gpu)
    measurement.mean_batch, measurement.busy_fraction = batch_and_busy(
        stats_before, model_pool_stats(), measurement.wall_s
    )
    measurement.stages_ms = {
        "client encode": median_ms(partial(encode_image, images[0], timeout=None)),
        **server_stage_means_ms(responses),
        "client decode": client_decode_ms(responses),
    }
    measurement.replicas = running_replicas()
    return measurement


@contextmanager
def application_client(transport: str, url: str, *, reuse_images: bool) -> Iterator[tuple[object, str, list]]:
    """A client of `transport`, its label in row names, and the list its raw responses are recorded into."""
    if transport == "http":
        client, label = Sam3HttpClient(url, timeout=CLIENT_TIMEOUT_S, reuse_images=reuse_images), "HTTP"
    else:
        client, label = Sam3HandleClient(APP_NAME, timeout=CLIENT_TIMEOUT_S, reuse_images=reuse_images), "handle"
    responses: list = []
    client.on_response = responses.append  # the server's stage timings and the masks are read from them
    try:
        yield client, label, responses
    finally:
        if transport == "http":
            client.close()


def measure_application(
    checkpoint: Path, args, inputs: dict[str, list], ray_address: str, port: int, workdir: Path
) -> list[Measurement]:
    """On distinct images with the vision-feature cache off: each transport at each concurrency with the photo
    paths, and with the arrays at concurrency 1, batching on and off, each deployment pinned at its minimum
    replicas; then the first transport at the highest concurrency with autoscaling on, after `--autoscale-load-s`
    of load; then one row of cache hits (one photo again and again, the cache on as configured)."""
    transports = [transport for transport in ("http", "handle") if transport in args.only]
    runs = [("photo path", c) for c in args.concurrency] + [("numpy array", 1)]
    photos, top = inputs["photo path"], max(args.concurrency)
    rows, counts, url = [], [], None

    def deploy(name: str, **options) -> str:
        """`serve run` the first configuration, and each later one over the running application."""
        config = app_config(
            checkpoint,
            port,
            args.device,
            dtype=args.dtype,
            compile=args.compile,
            compile_regions=args.compile_regions,
            **options,
        )
        path = workdir / f"{name}.yaml"
        return serve_run(config, path, ray_address) if url is None else redeploy(config, path, ray_address)

    batched = [("batching on", None)] if args.max_batch_size is None else [
        (f"batching on, max batch {size}", size) for size in args.max_batch_size
    ]
    pinned = {"batched": batched, "unbatched": [("batching off", 1)]}
    for batching, max_batch_size in (run for name in pinned if name in args.configurations for run in pinned[name]):
        url = deploy(batching.replace(" ", "-").replace(",", ""), max_batch_size=max_batch_size, vision_cache_bytes=0)
        if not counts:
            counts = instance_counts(photos, args)
        for transport in transports:
            with application_client(transport, url, reuse_images=False) as (client, label, responses):
                for input_label, concurrency in runs:
                    name = f"{label}, {input_label}, c={concurrency}, {batching}"
                    key = (transport, input_label, concurrency, batching)
                    images = inputs[input_label]
                    rows.append(measure_client(name, key, client, responses, images, counts, args, concurrency))

    if "autoscaling" not in args.configurations:
        return rows
    url = deploy("autoscaling", max_batch_size=None, vision_cache_bytes=0, autoscaling=True)
    with application_client(transports[0], url, reuse_images=False) as (client, label, responses):
        name = f"{label}, photo path, c={top}, batching on, autoscaling on (after {args.autoscale_load_s:g} s of load)"
        key = (transports[0], "photo path", top, "autoscaling")
        load_s = args.autoscale_load_s
        rows.append(measure_client(name, key, client, responses, photos, counts, args, top, load_s))

    if "cache-hits" not in args.configurations:
        return rows
    url = deploy("cache-on", max_batch_size=None)  # args change: every replica restarts
    with application_client(transports[0], url, reuse_images=True) as (client, label, responses):
        name = f"{label}, one repeated photo (cache hits), c=1, batching on, cache on"
        key = (transports[0], "cache hits", 1, "batching on")
        rows.append(measure_client(name, key, client, responses, photos[:1], counts[:1], args, 1, SETTLE_S))
    return rows


# ---------------------------------------------------------------- the bare Serve floor

floor_api = FastAPI()


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
class FloorStage:
    """Does no work: hands on an array of the asked size, made once, so only Serve's hops are timed."""

    def __init__(self):
        self.arrays: dict[int, np.ndarray] = {}

    def forward(self, previous: np.ndarray | None, out_bytes: int) -> np.ndarray:
        if out_bytes not in self.arrays:
            self.arrays[out_bytes] = np.zeros(out_bytes, dtype=np.uint8)
        return self.arrays[out_bytes]


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
@serve.ingress(floor_api)
class FloorIngress:
    """The application's shape with no work: three chained calls, each stage's response passed on unawaited."""

    def __init__(self, first, second, third):
        self.stages = (first, second, third)

    @floor_api.post("/chain")
    async def chain(self, first_bytes: int = 0, second_bytes: int = 0) -> dict:
        first, second, third = self.stages
        into_second = first.forward.remote(None, first_bytes)
        into_third = second.forward.remote(into_second, second_bytes)
        await third.forward.remote(into_third, 0)
        return {"ok": True}

    @floor_api.post("/echo")
    async def echo(self, request: Request) -> Response:
        return Response(await request.body(), media_type="application/octet-stream")


def post_ok(http: httpx.Client, path: str, **kwargs) -> None:
    http.post(path, **kwargs).raise_for_status()


def measure_floor(url: str) -> list[Measurement]:
    """p50 at concurrency 1 of the bare chain with small and large payloads, and of an HTTP echo."""
    stages = [FloorStage.options(name=f"FloorStage{i}").bind() for i in (1, 2, 3)]
    serve.run(FloorIngress.bind(*stages), name="floor", route_prefix="/floor")
    rows = []
    with httpx.Client(base_url=f"{url}/floor", timeout=60) as http:
        for name, (first_bytes, second_bytes) in FLOOR_CHAINS.items():
            params = {"first_bytes": first_bytes, "second_bytes": second_bytes}
            chain = partial(post_ok, http, "/chain", params=params)
            rows.append(time_sequential(name, chain, FLOOR_REQUESTS, FLOOR_WARMUP, ("floor", name)))
        echo = partial(post_ok, http, "/echo", content=os.urandom(ECHO_BODY_BYTES))
        rows.append(time_sequential(ECHO_NAME, echo, FLOOR_REQUESTS, FLOOR_WARMUP, ("floor", ECHO_NAME)))
    serve.delete("floor")
    return rows


# ---------------------------------------------------------------- report


def format_ms(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(title: str, headers: list[str], rows: list[list[str]], markdown: bool) -> None:
    print(f"### {title}" if markdown else title)
    if markdown:
        print("| " + " | ".join(headers) + " |")
        print("|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        widths = [max(len(cells[i]) for cells in [headers, *rows]) for i in range(len(headers))]
        for name, *figures in [headers, *rows]:
            aligned = [name.ljust(widths[0]), *(cell.rjust(width) for cell, width in zip(figures, widths[1:]))]
            print("  ".join(aligned))
    print()


def stage_columns(rows: list[Measurement]) -> list[str]:
    """The client's stages around the server's, in data-path order; stages only a newer server sends come last."""
    sent = {stage for row in rows for stage in row.stages_ms if stage.startswith("server ")}
    known = [f"server {stage}" for stage in SERVER_STAGES]
    later = sorted(sent - {*known, BETWEEN_STAGES}) + ([BETWEEN_STAGES] if BETWEEN_STAGES in sent else [])
    return ["client encode", *known, *later, "client decode"]


def print_measurements(title: str, rows: list[Measurement], markdown: bool, *, served: bool) -> None:
    """Throughput and latency; for the served rows also the model replica's figures and the time per stage."""
    headers = ["configuration", "images/s", "p50 ms", "p95 ms", "p99 ms", "instances", "GPU util", "GPU MiB"]
    stages = stage_columns(rows) if served else []
    if served:
        headers += ["errors", "mean batch", "model busy", "replicas pre/model/post (+starting)"]
        headers += [f"{stage} ms" for stage in stages]
    table = []
    for row in rows:
        cells = [row.name, f"{row.images_per_s:.2f}", *(format_ms(row.percentile_ms(q)) for q in (50, 95, 99))]
        cells.append(format_ms(row.instances))
        cells.append("-" if row.gpu_utilization is None else f"{row.gpu_utilization:.0%}")
        cells.append(format_ms(row.gpu_memory_mib, 0))
        if served:
            busy = "-" if row.busy_fraction is None else f"{row.busy_fraction:.0%}"
            cells += [str(row.errors), format_ms(row.mean_batch, 2), busy, row.replicas or "-"]
            cells += [format_ms(row.stages_ms.get(stage)) for stage in stages]
        table.append(cells)
    print_table(title, headers, table, markdown)


def print_hop_bytes(by_call: dict[str, dict[str, int]], instances: int, markdown: bool) -> None:
    calls = list(by_call)
    hops = list(by_call[calls[0]])
    table = [[hop, *(f"{by_call[call][hop]:,}" for call in calls)] for hop in hops]
    title = f"Bytes per hop of one request (the first photo, {instances} instances), from the stages' own functions"
    print_table(title, ["hop", *calls], table, markdown)


def print_floor(rows: list[Measurement], markdown: bool) -> None:
    table = [[row.name, format_ms(row.percentile_ms(50)), format_ms(row.percentile_ms(95))] for row in rows]
    print_table("Bare Ray Serve floor, concurrency 1", ["configuration", "p50 ms", "p95 ms"], table, markdown)


def find(rows: list[Measurement], *key) -> Measurement | None:
    return next((row for row in rows if row.key == key), None)


def ratio(numerator: Measurement | None, denominator: Measurement | None) -> str:
    if numerator is None or denominator is None:
        return "-"
    return f"{numerator.images_per_s / denominator.images_per_s:.2f}x"


def print_targets(rows: list[Measurement], args) -> None:
    """The figures issues 8 and 17 set targets on, from this run's rows ("-" where a section was not run)."""

    def p50(*key) -> float | None:
        row = find(rows, *key)
        return None if row is None else row.percentile_ms(50)

    def in_ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f} ms"

    def overhead(label: str) -> str:
        application, core = p50("http", label, 1, "batching on"), p50("core", label)
        return in_ms(None if application is None or core is None else application - core)

    floor = [in_ms(p50("floor", name)) for name in [*FLOOR_CHAINS, ECHO_NAME]]
    http_8 = find(rows, "http", "photo path", 8, "batching on")
    transformers_alone = find(rows, "transformers", "photo path")
    batching_off = find(rows, "http", "photo path", 8, "batching off")
    four_over_one = [
        f"{p50('prompts', PROMPT_COUNTS[-1], kind) / p50('prompts', 1, kind):.2f}x" if p50("prompts", 1, kind) else "-"
        for kind in ("new", "cached")
    ]
    top = max(args.concurrency)
    http_top = find(rows, "http", "photo path", top, "batching on")
    top_figures = "-" if http_top is None else f"{http_top.images_per_s:.2f} images/s"
    top_instances = "-" if http_top is None else format_ms(http_top.instances)
    http_1 = p50("http", "photo path", 1, "batching on")
    source = f"preset {args.preset}" if args.checkpoint is None else str(args.checkpoint)
    lines = [
        f"overhead, HTTP p50 at c=1 minus our core's p50: photo path {overhead('photo path')} (target <= 30 ms on "
        f"the 2-core machine), numpy array {overhead('numpy array')} (target <= 40 ms)",
        f"bare-chain floor p50: small payload {floor[0]}, 3 MB + 6 MB arrays {floor[1]}; "
        f"HTTP echo of 900 kB {floor[2]}",
        f"c=8, photo path, HTTP: application / transformers in process {ratio(http_8, transformers_alone)} "
        f"(target >= 1.0x on CPU, mid preset); batching on / off {ratio(http_8, batching_off)} (target >= 1.0x)",
        f"{PROMPT_COUNTS[-1]} texts in one request / 1 text, p50: texts new each call {four_over_one[0]}, "
        f"cached {four_over_one[1]} (target <= 1.5x)",
        f"c={top}, photo path, HTTP: {top_figures} with {top_instances} instances per answer, application / "
        f"transformers in process {ratio(http_top, transformers_alone)}; HTTP p50 at c=1 {in_ms(http_1)}, "
        f"our core's {in_ms(p50('core', 'photo path'))} (issue 17, full preset, bf16 on a GPU: with <= 10 instances "
        f">= 55 images/s and p50 within 10 ms of our core's; with ~150, >= 2.0x and p50 <= 150 ms)",
        f"this run: {source}, device {args.device}, dtype {args.dtype}",
    ]
    print("### Targets (issues 8 and 17)" if args.markdown else "Targets (issues 8 and 17)")
    for line in lines:
        print(f"- {line}" if args.markdown else f"  {line}")


# ---------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=PRESETS, default="tiny", help="random-weight checkpoint to build and use")
    source.add_argument("--checkpoint", type=Path, help="a checkpoint directory instead of a preset")
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="cuda: the application runs the GPU profile"
    )
    parser.add_argument(
        "--dtype",
        choices=(*DTYPES, "auto"),
        default="auto",
        help="of every model, in process and in the application; auto: bfloat16 on cuda, float32 on cpu",
    )
    parser.add_argument(
        "--autoscale-load-s",
        type=float,
        default=60,
        help="untimed load at the highest concurrency before the autoscaling row, so autoscaling can act "
        "(Serve waits upscale_delay_s, 30 s, before it adds a replica)",
    )
    parser.add_argument("--requests", type=int, default=16, help="timed requests per configuration")
    parser.add_argument("--concurrency", default="1,8,32", help="client threads, comma-separated")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"sections to run, from {','.join(SECTIONS)}")
    parser.add_argument(
        "--configurations",
        default=",".join(CONFIGURATIONS),
        help=f"the application's configurations that http and handle run, from {','.join(CONFIGURATIONS)}",
    )
    parser.add_argument(
        "--max-batch-size",
        type=lambda value: [int(size) for size in value.split(",")],
        help="the batched configuration once per size, comma-separated (changed live: user_config); "
        "default: serve_config.yaml's",
    )
    parser.add_argument("--images", type=int, default=48, help="distinct photos the requests go through, in turn")
    parser.add_argument("--text", default="cat", help="the text prompt")
    parser.add_argument(
        "--score-threshold",
        type=float,
        help=f"keep instances scoring above it (default {DEFAULT_SCORE_THRESHOLD}; random weights keep about 146 of "
        "the full preset's 200 queries at 0.5, real weights a handful)",
    )
    parser.add_argument(
        "--max-instances", type=int, help="at most this many instances per answer, the best scoring (max_instances)"
    )
    parser.add_argument(
        "--compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="our core in process and the application's model pool with their layers compiled (compile: true); "
        "auto: on cuda",
    )
    parser.add_argument(
        "--compile-regions",
        type=lambda value: value.split(","),
        help=f"with the layers compiled: which stacks, of {','.join(REGIONS)} (compile_regions); "
        f"default: {','.join(DEFAULT_REGIONS)}",
    )
    parser.add_argument("--markdown", action="store_true", help="print tables for benchmarks/RESULTS.md")
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.only = args.only.split(",")
    unknown = set(args.only) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    args.configurations = args.configurations.split(",")
    unknown = set(args.configurations) - set(CONFIGURATIONS)
    if unknown:
        parser.error(f"unknown configurations {sorted(unknown)}; choose from {','.join(CONFIGURATIONS)}")
    args.compile = {"on": True, "off": False}.get(args.compile, "auto")
    args.gpu = args.device == "cuda"  # sample the GPU's utilization during the timed requests
    # Resolved here, by the server's own rule: the application is told the name, float32 or bfloat16.
    args.dtype = resolve_dtype(args.dtype, args.device)
    if args.images < 1:
        parser.error("--images must be at least 1")
    if args.score_threshold is not None and not 0 < args.score_threshold < 1:
        parser.error("--score-threshold must be between 0 and 1")
    if args.max_instances is not None and args.max_instances < 1:
        parser.error("--max-instances must be at least 1")
    # What every request asks, in process and of the application; an option not given is not sent.
    args.prompt = {"text": args.text}
    if args.score_threshold is not None:
        args.prompt["score_threshold"] = args.score_threshold
    if args.max_instances is not None:
        args.prompt["max_instances"] = args.max_instances
    if args.checkpoint is not None:
        args.preset = None
    return args


def main() -> None:
    args = parse_args()
    checkpoint = args.checkpoint or preset_checkpoint(args.preset)
    workdir = Path(tempfile.mkdtemp(prefix="sam3-compare-"))
    photos, arrays = write_photos(workdir, args.images)
    inputs = {"photo path": photos, "numpy array": arrays}
    print_header(args, checkpoint, photos)
    in_process = measure_in_process(checkpoint, args, inputs) if "inprocess" in args.only else []
    prompts = measure_prompts(checkpoint, args, photos[0]) if "prompts" in args.only else []
    hops = measure_hop_bytes(checkpoint, args, photos[0]) if "bytes" in args.only else None
    served, floor = [], []
    if {"http", "handle", "floor"} & set(args.only):
        ray_address = start_local_ray(max(8, os.cpu_count() or 1))  # room for autoscaling on larger machines
        try:
            port = free_port()
            if {"http", "handle"} & set(args.only):
                served = measure_application(checkpoint, args, inputs, ray_address, port, workdir)
            else:
                serve.start(http_options={"host": "127.0.0.1", "port": port})
            if "floor" in args.only:
                floor = measure_floor(f"http://127.0.0.1:{port}")
        finally:
            serve.shutdown()
            ray.shutdown()
    if in_process:
        print_measurements("In one process, one image at a time", in_process, args.markdown, served=False)
    if prompts:
        print_measurements("Several texts in one request, in one process", prompts, args.markdown, served=False)
    if hops:
        print_hop_bytes(*hops, args.markdown)
    if served:
        title = (
            "The application, through the clients' run() (server stages: mean ms; client stages: median ms; "
            "instances: each image's, counted once with detections)"
        )
        print_measurements(title, served, args.markdown, served=True)
    if floor:
        print_floor(floor, args.markdown)
    print_targets(in_process + prompts + served + floor, args)

if __name__ == "__main__":
    main()
