"""Interactive sessions through the application, with the vision-feature cache on and off side by side.

    python -m benchmarks.interactive [--preset mid | --checkpoint DIR] [--device cpu] [--model-replicas 2]
                                     [--sessions 4] [--rounds 2] [--markdown]

A session is one user on one new image: a text prompt, then 10 follow-ups that alternate point and text
prompts (`benchmarks.interactive_model.FOLLOW_UPS`), each sent when the last is answered. `--sessions`
sessions run at once and interleave; `--rounds` such groups run one after the other, each on new images.
Requests go over HTTP; a follow-up names its image by the id of the first answer when the service gave
one, as both clients do, else it sends the image again. The application starts as the tests start it (the CPU
profile on a GPU-less machine), with `--model-replicas` model replicas and the image-affinity router.

Reported per configuration: the first request's and the follow-ups' client latency and server model time
(medians), follow-up / first model time, and with the cache on, the share of follow-ups whose features
came from the cache (the replicas' own counts) and how the new images spread over the replicas.
Random-weight checkpoints cost what real ones cost; their masks are meaningless.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
from ray import serve

from benchmarks.compare import CLIENT_TIMEOUT_S, app_config, preset_checkpoint, print_table
from benchmarks.interactive_model import FIRST, FOLLOW_UPS
from benchmarks.machine import cpu_name, git_commit
from client.images import encode_image
from client.protocol import SEGMENT_PATH, SegmentRequest, SegmentResponse
from tests.conftest import random_image
from tests.serve.app_runner import replica_stats
from tools.launch import APP_NAME, free_port, serve_run, start_local_ray
from tools.profiles import MODEL_POOL

@dataclass
class Call:
    first: bool
    client_ms: float  # the HTTP round trip, from this process
    model_ms: float  # the server's `timings_ms["model"]`


@dataclass
class Configuration:
    name: str
    calls: list[Call]
    follow_up_hits: float | None  # share of follow-ups answered from the cache
    new_images: list[int] | None  # new images each model replica took

    def median(self, first: bool, field: str) -> float:
        return statistics.median(getattr(call, field) for call in self.calls if call.first == first)


def segment(http: httpx.Client, **fields) -> SegmentResponse:
    response = http.post(
        SEGMENT_PATH, content=SegmentRequest(**fields).model_dump_json(), headers={"content-type": "application/json"}
    )
    response.raise_for_status()
    return SegmentResponse.model_validate_json(response.content)


def run_session(http: httpx.Client, seed: int) -> list[Call]:
    """One user: the image, then each follow-up by the image's id when the service gave one (as the clients
    do), else with the image again."""
    image = encode_image(random_image(480, 640, seed=seed), timeout=None)
    calls, image_id = [], None
    for prompt in [FIRST, *FOLLOW_UPS]:
        started = time.perf_counter()
        answer = segment(http, image_id=image_id, **prompt) if image_id else segment(http, image=image, **prompt)
        calls.append(Call(not calls, (time.perf_counter() - started) * 1000, answer.timings_ms["model"]))
        image_id = answer.image_id
    return calls


def measure(name: str, url: str, args, first_seed: int) -> Configuration:
    """`args.rounds` groups of `args.sessions` concurrent sessions, with the replicas' cache counts around them."""
    print(f"measuring {name}", file=sys.stderr)
    with httpx.Client(base_url=url, timeout=CLIENT_TIMEOUT_S) as http:
        run_session(http, seed=first_seed - 1)  # warm-up: every prompt's text encoding, on one replica at least
        before = replica_stats(args.model_replicas)
        calls: list[Call] = []
        with ThreadPoolExecutor(args.sessions) as pool:
            for round_ in range(args.rounds):
                seeds = range(first_seed + round_ * args.sessions, first_seed + (round_ + 1) * args.sessions)
                calls += [call for session in pool.map(partial(run_session, http), seeds) for call in session]
        after = replica_stats(args.model_replicas)
    follow_ups = sum(not call.first for call in calls)
    return Configuration(name, calls, *cache_figures(before, after, follow_ups))


def cache_figures(before: dict, after: dict, follow_ups: int) -> tuple[float | None, list[int] | None]:
    """The share of follow-ups answered from the cache (the replicas' hits), and the new images (misses) each
    replica took; None without a cache."""
    if not after[next(iter(after))]["vision_cache"]:
        return None, None
    counts = {
        replica: {field: stats["vision_cache"]["sam3"][field] - before[replica]["vision_cache"]["sam3"][field] for field in ("hits", "misses")}
        for replica, stats in after.items()
    }
    return sum(count["hits"] for count in counts.values()) / follow_ups, sorted(count["misses"] for count in counts.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=("tiny", "mid", "full"), default="mid")
    source.add_argument("--checkpoint", type=Path)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model-replicas", type=int, default=2)
    parser.add_argument("--sessions", type=int, default=4, help="concurrent, interleaved sessions")
    parser.add_argument("--rounds", type=int, default=2, help="groups of sessions, one after the other")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    checkpoint = args.checkpoint or preset_checkpoint(args.preset)
    print(
        f"commit {git_commit()}, {cpu_name()}, {args.device}; checkpoint {checkpoint} "
        f"({'random weights: masks meaningless' if not args.checkpoint else 'given'}); {args.model_replicas} model "
        f"replicas; {args.rounds} x {args.sessions} concurrent sessions of 1 + {len(FOLLOW_UPS)} prompts"
    )
    ray_address, port = start_local_ray(), free_port()
    configurations = []
    with tempfile.TemporaryDirectory() as workdir:
        for index, (name, cache_bytes) in enumerate((("cache on", 4_000_000_000), ("cache off", 0))):
            config = app_config(checkpoint, port, args.device, None)
            config["applications"][0]["args"]["vision_cache_bytes"] = cache_bytes
            pool = next(d for d in config["applications"][0]["deployments"] if d["name"] == MODEL_POOL)
            pool["autoscaling_config"].update(min_replicas=args.model_replicas, max_replicas=args.model_replicas)
            if index:
                serve.delete(APP_NAME)
            url = serve_run(config, Path(workdir) / f"{index}.yaml", ray_address)
            configurations.append(measure(name, url, args, first_seed=1000 * (index + 1)))
    rows = []
    for configuration in configurations:
        first_model, follow_model = configuration.median(True, "model_ms"), configuration.median(False, "model_ms")
        rows.append(
            [
                configuration.name,
                f"{configuration.median(True, 'client_ms'):.1f}",
                f"{first_model:.1f}",
                f"{configuration.median(False, 'client_ms'):.1f}",
                f"{follow_model:.1f}",
                f"{follow_model / first_model:.1%}",
                "-" if configuration.follow_up_hits is None else f"{configuration.follow_up_hits:.0%}",
                "-" if configuration.new_images is None else " / ".join(map(str, configuration.new_images)),
            ]
        )
    print_table(
        "Interactive sessions over HTTP (medians, ms)",
        ["configuration", "first: HTTP", "first: model", "follow-up: HTTP", "follow-up: model",
         "follow-up / first (model)", "follow-ups from the cache", "new images per replica"],
        rows,
        args.markdown,
    )


if __name__ == "__main__":
    main()
