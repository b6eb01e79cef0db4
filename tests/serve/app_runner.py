"""Test helpers around the real multi-process application; starting it lives in `deployments.launch`."""

from __future__ import annotations

from ray import serve

from deployments.launch import APP_NAME, REPO, SERVE_CONFIG, cpu_config, free_port, serve_run, wait_until_running

__all__ = [
    "APP_NAME",
    "REPO",
    "SERVE_CONFIG",
    "cpu_config",
    "deployment",
    "free_port",
    "replica_count",
    "serve_run",
    "wait_until_running",
]


def deployment(config: dict, name: str) -> dict:
    (found,) = [d for d in config["applications"][0]["deployments"] if d["name"] == name]
    return found


def replica_count(deployment_name: str) -> int:
    """RUNNING replicas of one deployment of the app."""
    status = serve.status().applications[APP_NAME].deployments[deployment_name]
    return status.replica_states.get("RUNNING", 0)
