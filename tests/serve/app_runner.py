"""Test helpers around the real multi-process application; starting it lives in `tools.launch`."""

from __future__ import annotations

import ray
from ray import serve

from tools.launch import APP_NAME, REPO, SERVE_CONFIG, cpu_config, free_port, serve_run, serve_start, wait_until_running

__all__ = [
    "APP_NAME",
    "REPO",
    "SERVE_CONFIG",
    "cpu_config",
    "deployment",
    "free_port",
    "ingress_actor",
    "ingress_references",
    "replica_count",
    "replica_stats",
    "serve_run",
    "serve_start",
    "wait_until_running",
]


def deployment(config: dict, name: str) -> dict:
    (found,) = [d for d in config["applications"][0]["deployments"] if d["name"] == name]
    return found


def replica_count(deployment_name: str) -> int:
    """RUNNING replicas of one deployment of the app."""
    status = serve.status().applications[APP_NAME].deployments[deployment_name]
    return status.replica_states.get("RUNNING", 0)


def model_pool_batch_sizes() -> dict[int, int]:
    """How many batches of each size a model replica ran (the one replica of the CPU profile's pinned pool)."""
    handle = serve.get_deployment_handle("Sam3ModelPool", app_name=APP_NAME)
    return handle.stats.remote().result(timeout_s=60)["batch_sizes"]


def replica_stats(replicas: int, deployment_name: str = "Sam3ModelPool") -> dict[str, dict]:
    """`stats()` of each of the model pool's `replicas`, by replica id. Calls that name no image are routed at
    random over the replicas, so this asks until every one has answered."""
    handle = serve.get_deployment_handle(deployment_name, app_name=APP_NAME)
    seen: dict[str, dict] = {}
    for _ in range(100 * replicas):
        stats = handle.stats.remote().result(timeout_s=60)
        seen[stats["replica"]] = stats
        if len(seen) == replicas:
            return seen
    raise TimeoutError(f"only {len(seen)} of {replicas} replicas of {deployment_name} answered")


def ingress_actor() -> ray.actor.ActorHandle:
    """The ingress replica's actor (one replica in the CPU profile), to run code inside it."""
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith(f"SERVE_REPLICA::{APP_NAME}#Sam3Ingress#"):
            return ray.get_actor(actor["name"], namespace=actor["namespace"])
    raise RuntimeError("no ingress replica found")


def _held_references(_actor) -> int:
    """Runs inside a replica: how many objects its core worker holds references to."""
    return len(ray._private.worker.global_worker.core_worker.get_all_reference_counts())


def ingress_references() -> int:
    """The objects the ingress replica holds references to (its own results and what it passed on)."""
    return ray.get(ingress_actor().__ray_call__.remote(_held_references))
