"""Start the real multi-process application from a `serve_config.yaml` profile, the way users do."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml
from ray import serve

from client.protocol import HEALTH_PATH
from deployments.profiles import cpu_profile

REPO = Path(__file__).resolve().parents[2]
SERVE_CONFIG = REPO / "serve_config.yaml"
APP_NAME = "sam3"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_config(checkpoint: str, port: int) -> dict:
    """The CPU profile of the repository's serve_config.yaml, on a test port and the tiny checkpoint."""
    config = cpu_profile(yaml.safe_load(SERVE_CONFIG.read_text()), checkpoint=checkpoint)
    config["http_options"].update(host="127.0.0.1", port=port)
    return config


def deployment(config: dict, name: str) -> dict:
    (found,) = [d for d in config["applications"][0]["deployments"] if d["name"] == name]
    return found


def serve_run(config: dict, path: Path, ray_address: str, timeout_s: float = 180) -> str:
    """`serve run CONFIG --non-blocking`, then wait until the app is RUNNING and healthy; returns its URL."""
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    subprocess.run(
        [Path(sys.executable).with_name("serve"), "run", str(path), "--non-blocking", "--address", ray_address],
        check=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        timeout=timeout_s,
    )
    base_url = f"http://127.0.0.1:{config['http_options']['port']}"
    wait_until_running(base_url, timeout_s)
    return base_url


def wait_until_running(base_url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications.get(APP_NAME)
        if status is not None and status.status == "DEPLOY_FAILED":
            raise RuntimeError(f"application {APP_NAME} failed to deploy: {status.message} {status.deployments}")
        if status is not None and status.status == "RUNNING":
            try:
                if httpx.get(base_url + HEALTH_PATH, timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
        time.sleep(0.5)
    raise TimeoutError(f"application {APP_NAME} not running after {timeout_s} s: {serve.status()}")


def replica_count(deployment_name: str) -> int:
    """RUNNING replicas of one deployment of the app."""
    status = serve.status().applications[APP_NAME].deployments[deployment_name]
    return status.replica_states.get("RUNNING", 0)
