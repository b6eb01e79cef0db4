"""The metrics' names and tags, and the shipped Grafana dashboard that plots them (no Ray cluster needed)."""

from __future__ import annotations

import json
import re

from ray.util.metrics import Metric

from deployments.metrics import IngressMetrics, ModelPoolMetrics
from sam3_serve_core.vision_cache import VisionFeatureCache
from tests.serve.app_runner import REPO

DASHBOARD = REPO / "deploy" / "grafana" / "sam3-dashboard.json"


def defined_metrics() -> dict[str, tuple[str, ...]]:
    attributes = [*vars(IngressMetrics()).values(), *vars(ModelPoolMetrics()).values()]
    metrics = [attribute for attribute in attributes if isinstance(attribute, Metric)]
    return {metric.info["name"]: metric.info["tag_keys"] for metric in metrics}


def test_every_metric_can_be_sliced_by_model():
    for name, tag_keys in defined_metrics().items():
        assert name.startswith("sam3_")
        assert "model_id" in tag_keys, name


def test_the_dashboard_plots_every_metric_and_only_defined_ones():
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    plotted = {match for expr in expressions for match in re.findall(r"ray_(sam3_\w+?)(?:_total|_bucket|_sum|_count)?\b", expr)}
    assert plotted == set(defined_metrics())
    tags = {tag for tag_keys in defined_metrics().values() for tag in tag_keys}
    for expr in expressions:
        for tag in re.findall(r"by \(([^)]*)\)", expr):
            assert set(part.strip() for part in tag.split(",")) <= tags | {"le"}, expr


def test_cache_counts_are_reported_per_cache_so_a_reloaded_model_never_counts_back():
    """A model unloaded and loaded again has a new, empty cache: its counts start over, and what is reported
    stays the increase of each cache (Ray's counters refuse negative increments)."""
    metrics = ModelPoolMetrics()
    first = VisionFeatureCache(max_bytes=10**6)
    for key in "aab":
        first.get(key)
    metrics.observe_cache("sam3", first)
    reloaded = VisionFeatureCache(max_bytes=10**6)
    reloaded.get("a")
    metrics.observe_cache("sam3", reloaded)
    first.get("c")
    metrics.observe_cache("sam3", first)
    assert metrics._reported_cache[first].misses == 4 and metrics._reported_cache[reloaded].misses == 1
