"""The service's metrics, through `ray.serve.metrics`.

Serve adds its own tags (application, deployment, replica) to each, and Ray exports them on every node's
Prometheus endpoint with a `ray_` prefix (counters also get `_total`): `ray_sam3_requests_total`, ...
The tags here are bounded sets (model ids from the configuration, prompt types, error codes, stages), so
no request can create a new time series.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping

from ray.serve.metrics import Counter, Gauge, Histogram

from client.protocol import SegmentResponse
from sam3_serve_core.messages import PreparedItem
from sam3_serve_core.vision_cache import CacheStats, VisionFeatureCache

# Time per stage, from the timings each stage adds to the response (`SegmentResponse.timings_ms`).
STAGES = ("preprocess", "queue", "model", "postprocess", "total")
UNKNOWN = "unknown"  # the tag of a request that failed before its model or prompt type was known

LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000, 120000]
COUNT_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
PIXEL_BOUNDARIES = [1e4, 1e5, 3e5, 1e6, 3e6, 1e7, 3e7, 1e8]


def stage_latencies(timings_ms: dict[str, float]) -> dict[str, float]:
    """The stages a dashboard plots, from a response's timings (a stage that did not run is absent)."""
    return {stage: timings_ms[stage] for stage in STAGES if stage in timings_ms}


class IngressMetrics:
    """What every request did: counted once, in the ingress that answers it (HTTP and handle callers alike)."""

    def __init__(self) -> None:
        self.requests = Counter(
            "sam3_requests",
            description="Requests answered, successful or not, by model and prompt type.",
            tag_keys=("model_id", "prompt_type"),
        )
        self.errors = Counter(
            "sam3_request_errors",
            description="Requests answered with an error, by model, prompt type and error code.",
            tag_keys=("model_id", "prompt_type", "error_code"),
        )
        self.stage_latency = Histogram(
            "sam3_stage_latency_ms",
            description="Milliseconds per stage: preprocess, queue (waiting for a batch), model, postprocess, total.",
            boundaries=LATENCY_BOUNDARIES_MS,
            tag_keys=("model_id", "stage"),
        )
        self.instances = Histogram(
            "sam3_instances_per_answer",
            description="Instances (masks) in each successful answer.",
            boundaries=COUNT_BOUNDARIES,
            tag_keys=("model_id", "prompt_type"),
        )
        self.image_pixels = Histogram(
            "sam3_image_pixels",
            description="Pixels (height x width) of each image answered.",
            boundaries=PIXEL_BOUNDARIES,
            tag_keys=("model_id",),
        )

    def observe_answer(self, model_id: str, response: SegmentResponse) -> None:
        tags = {"model_id": model_id, "prompt_type": response.prompt_type}
        self.requests.inc(tags=tags)
        self.instances.observe(len(response.scores), tags=tags)
        self.image_pixels.observe(response.height * response.width, tags={"model_id": model_id})
        for stage, milliseconds in stage_latencies(response.timings_ms).items():
            self.stage_latency.observe(milliseconds, tags={"model_id": model_id, "stage": stage})

    def observe_error(self, model_id: str, prompt_type: str, error_code: str) -> None:
        self.requests.inc(tags={"model_id": model_id, "prompt_type": prompt_type})
        self.errors.inc(tags={"model_id": model_id, "prompt_type": prompt_type, "error_code": error_code})


class ModelPoolMetrics:
    """How full the model's batches are: requests per batch, and prompts (texts, box sets, point sets) per batch.

    How the vision-feature cache does: lookups that hit or missed, evictions, and what it holds. And the video
    sessions a replica holds (their count and bytes), why they ended, and the frames they answered.
    """

    def __init__(self) -> None:
        self.batch_size = Histogram(
            "sam3_model_batch_size",
            description="Requests per model batch.",
            boundaries=[1, 2, 4, 8, 16, 32, 64],
            tag_keys=("model_id",),
        )
        self.batch_prompts = Histogram(
            "sam3_model_batch_prompts",
            description="Prompts per model batch (a request with several texts or box sets counts each).",
            boundaries=COUNT_BOUNDARIES,
            tag_keys=("model_id",),
        )
        self.cache_lookups = Counter(
            "sam3_vision_cache_lookups",
            description="Images looked up in the vision-feature cache, by outcome (hit: the ViT did not run).",
            tag_keys=("model_id", "outcome"),
        )
        self.cache_evictions = Counter(
            "sam3_vision_cache_evictions",
            description="Images' features evicted to stay within vision_cache_bytes.",
            tag_keys=("model_id",),
        )
        self.cache_bytes = Gauge(
            "sam3_vision_cache_bytes", description="Bytes of vision features the cache holds.", tag_keys=("model_id",)
        )
        self.cache_images = Gauge(
            "sam3_vision_cache_images", description="Images whose features the cache holds.", tag_keys=("model_id",)
        )
        self._reported_cache: weakref.WeakKeyDictionary[VisionFeatureCache, CacheStats] = weakref.WeakKeyDictionary()
        self.video_sessions = Gauge(
            "sam3_video_sessions", description="Video sessions a model replica holds.", tag_keys=("model_id",)
        )
        self.video_session_bytes = Gauge(
            "sam3_video_session_bytes",
            description="Bytes of the video sessions a model replica holds (frames on the host, tracking state on its device).",
            tag_keys=("model_id",),
        )
        self.video_sessions_ended = Counter(
            "sam3_video_sessions_ended",
            description="Video sessions ended, by reason: closed, idle (past idle_timeout_s), evicted (for room), "
            "model_unloaded.",
            tag_keys=("model_id", "reason"),
        )
        self.video_frames = Counter(
            "sam3_video_frames",
            description="Video frames tracked and answered (streamed or pushed), by task: concepts or objects.",
            tag_keys=("model_id", "task"),
        )

    def observe_cache(self, model_id: str, cache: VisionFeatureCache) -> None:
        """What changed in `cache` since its last report (batches overlap, so not since a batch began; a model
        loaded again has a new cache that counts from zero)."""
        tags = {"model_id": model_id}
        after = cache.stats()
        before = self._reported_cache.get(cache, CacheStats(0, 0, 0, 0, 0))
        self._reported_cache[cache] = after
        for outcome, count in (("hit", after.hits - before.hits), ("miss", after.misses - before.misses)):
            if count:
                self.cache_lookups.inc(count, tags={**tags, "outcome": outcome})
        if after.evictions > before.evictions:
            self.cache_evictions.inc(after.evictions - before.evictions, tags=tags)
        self.cache_bytes.set(after.bytes_held, tags=tags)
        self.cache_images.set(after.images_held, tags=tags)

    def observe_video_sessions(self, model_ids: Iterable[str], held: Mapping[str, Mapping[str, int]]) -> None:
        """What the replica holds now: `held` is per model its `sessions` and their `bytes`; a model of
        `model_ids` that holds none reports zero."""
        for model_id in {*model_ids, *held}:
            counts = held.get(model_id, {})
            self.video_sessions.set(counts.get("sessions", 0), tags={"model_id": model_id})
            self.video_session_bytes.set(counts.get("bytes", 0), tags={"model_id": model_id})

    def observe_batch(self, model_id: str, items: list[PreparedItem]) -> None:
        tags = {"model_id": model_id}
        self.batch_size.observe(len(items), tags=tags)
        self.batch_prompts.observe(sum(len(item.prompts) for item in items), tags=tags)
