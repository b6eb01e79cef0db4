"""Start the application from serve_config.yaml's CPU profile with `serve run`, exactly as a user would.

Shared by the offline demo and the Serve tests, so both exercise the real command and the real config.
Needs a Ray instance already initialized in this process (for `serve.status()`).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import ray
import yaml
from ray import serve

from client.protocol import READY_PATH
from tools.profiles import cpu_profile

REPO = Path(__file__).resolve().parents[1]
SERVE_CONFIG = REPO / "serve_config.yaml"
APP_NAME = "sam3"


def start_local_ray(num_cpus: int = 8) -> str:
    """A new local Ray instance (even if another runs on this machine), with `num_cpus` logical CPUs so that
    fractional replicas fit; returns its address. Token authentication guards Ray's control plane, which a
    local, private instance does not expose: it is off, said explicitly rather than left to Ray's default."""
    os.environ["RAY_AUTH_MODE"] = "disabled"
    context = ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    return context.address_info["gcs_address"]


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1, so concurrent runs do not fight over 8000."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_config(checkpoint: str, port: int) -> dict:
    """The CPU profile of the repository's serve_config.yaml, on `checkpoint`, served on 127.0.0.1:`port`."""
    config = cpu_profile(yaml.safe_load(SERVE_CONFIG.read_text()), checkpoint=checkpoint)
    config["http_options"].update(host="127.0.0.1", port=port)
    return config


def serve_run(config: dict, path: Path, ray_address: str, timeout_s: float = 180) -> str:
    """Write `config` to `path`, `serve run` it non-blocking on `ray_address`, wait until ready; return its URL."""
    base_url = serve_start(config, path, ray_address, timeout_s)
    wait_until_running(base_url, timeout_s)
    return base_url


def serve_start(config: dict, path: Path, ray_address: str, timeout_s: float = 180) -> str:
    """Write `config` to `path` and `serve run` it non-blocking on `ray_address`; return its URL at once."""
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    command = [Path(sys.executable).with_name("serve"), "run", str(path), "--non-blocking", "--address", ray_address]
    result = subprocess.run(
        command,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    if result.returncode != 0:
        raise RuntimeError(f"`serve run {path}` exited with {result.returncode}:\n{result.stderr[-4000:]}")
    return f"http://127.0.0.1:{config['http_options']['port']}"


def wait_until_running(base_url: str, timeout_s: float) -> None:
    """Until the app is RUNNING and its readiness answers 200; fails at once if it cannot deploy."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications.get(APP_NAME)
        if status is not None and status.status == "DEPLOY_FAILED":
            raise RuntimeError(f"application {APP_NAME} failed to deploy: {status.message} {status.deployments}")
        if status is not None and status.status == "RUNNING":
            try:
                if httpx.get(base_url + READY_PATH, timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
        time.sleep(0.5)
    raise TimeoutError(f"application {APP_NAME} not running after {timeout_s} s: {serve.status()}")
