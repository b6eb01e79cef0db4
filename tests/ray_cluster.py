"""A real Ray cluster made of `ray start --block` processes, for tests that need what `ray.init()` cannot give:
`serve deploy` and `ray job submit` against a head node, and worker nodes that join, die and come back.

Each node is one `ray start --block` process in a process group of its own, so stopping that group stops
that node only, and each has its own temp dir: `ray start` records its address there, and a record in the
default one (/tmp/ray) would make every later `ray.init()` on this machine try to join a cluster after it
is gone. Every port a node listens on is chosen free, so clusters of concurrent runs never collide.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import yaml

from tools.launch import APP_NAME, REPO, free_port

BIN = Path(sys.executable).parent
NO_AGENT_YET = "No available agent to submit job"


class Node:
    """One `ray start --block` process (a head or a worker node) and its temp dir."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path):
        self.temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: socket paths have a length limit
        self.node_id: str | None = None  # known once the node is ALIVE
        self.log = log_path.open("w")
        self.process = subprocess.Popen(
            [BIN / "ray", "start", "--block", *args, f"--dashboard-agent-listen-port={free_port()}",
             "--disable-usage-stats", f"--temp-dir={self.temp_dir}"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """SIGTERM: `ray start --block` stops its node's processes; SIGKILL: the node crashes, as a lost machine."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=60)
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


class Cluster:
    """A head node, and worker nodes added with `add_worker`, on this machine; `stop` stops every node."""

    def __init__(self, tmp_path: Path, *, num_cpus: int = 8):
        self.tmp_path = tmp_path
        self.gcs_port, self.dashboard_port, self.http_port = free_port(), free_port(), free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "disabled",
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "RAY_ADDRESS": self.address,
        }
        self.workers: list[Node] = []
        self.head = Node(
            ["--head", f"--port={self.gcs_port}", f"--num-cpus={num_cpus}", f"--dashboard-port={self.dashboard_port}",
             "--include-dashboard=true", f"--ray-client-server-port={free_port()}"],
            self.env, tmp_path / "ray-head.log",
        )  # fmt: skip
        try:
            wait_for(lambda: self.ray("job", "list", check=False).returncode == 0, 120, "the job server to answer")
        except BaseException:
            self.stop()
            raise

    def add_worker(self, *, num_cpus: int, resources: dict[str, float] | None = None) -> Node:
        """A worker node that joins the head offering `num_cpus` and `resources`; returned once it is ALIVE."""
        before = {node["node_id"] for node in self.alive_nodes()}
        worker = Node(
            [f"--address=127.0.0.1:{self.gcs_port}", f"--num-cpus={num_cpus}", "--num-gpus=0",
             f"--resources={json.dumps(resources or {})}"],
            self.env, self.tmp_path / f"ray-worker-{len(self.workers)}.log",
        )  # fmt: skip
        self.workers.append(worker)

        def joined() -> bool:
            # Not the head: the state API may list no node yet when `before` is taken, and then the head too.
            worker.node_id = next(
                (
                    node["node_id"]
                    for node in self.alive_nodes()
                    if node["node_id"] not in before and not node["is_head_node"]
                ),
                None,
            )
            return worker.node_id is not None

        wait_for(joined, 120, "the worker node to join")
        return worker

    def alive_nodes(self) -> list[dict]:
        """The cluster's ALIVE nodes as the state API lists them (`node_id`, `is_head_node`, `resources_total`)."""
        from ray.util.state import list_nodes

        return [
            node.__dict__
            for node in list_nodes(
                address=self.address, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False
            )
        ]

    def replica_nodes(self) -> dict[str, set[str]]:
        """Each deployment of the application, with the node ids its ALIVE replicas run on."""
        from ray.util.state import list_actors

        prefix = f"SERVE_REPLICA::{APP_NAME}#"
        placed: dict[str, set[str]] = {}
        for actor in list_actors(address=self.address, filters=[("state", "=", "ALIVE")], limit=1000):
            if (actor.name or "").startswith(prefix):
                placed.setdefault(actor.name[len(prefix) :].split("#")[0], set()).add(actor.node_id)
        return placed

    def ray(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([BIN / "ray", *args], env=self.env, capture_output=True, text=True, check=check,
                              timeout=timeout, cwd=REPO)  # fmt: skip

    def serve_deploy(self, config_path: Path, timeout_s: float = 300) -> None:
        """`serve deploy` as a user runs it, then wait until the application is RUNNING."""
        deployed = subprocess.run([BIN / "serve", "deploy", str(config_path), "--address", self.address],
                                  env=self.env, capture_output=True, text=True, cwd=REPO, timeout=120)  # fmt: skip
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        try:
            wait_for(lambda: self.app_status() == "RUNNING", timeout_s, "the application to run")
        except TimeoutError as error:
            status = subprocess.run([BIN / "serve", "status", "--address", self.address], env=self.env,
                                    capture_output=True, text=True, cwd=REPO, timeout=60)  # fmt: skip
            raise TimeoutError(f"{error}; `serve status` says:\n{status.stdout}{status.stderr}") from None

    def app_status(self) -> str | None:
        """The application's status from `serve status`; a failed deploy fails the test at once."""
        result = subprocess.run([BIN / "serve", "status", "--address", self.address], env=self.env,
                                capture_output=True, text=True, cwd=REPO, timeout=60)  # fmt: skip
        status = yaml.safe_load(result.stdout or "{}") or {}
        application = (status.get("applications") or {}).get(APP_NAME) or {}
        assert application.get("status") != "DEPLOY_FAILED", result.stdout
        return application.get("status")

    def submit(self, *job_args: str, submission_id: str | None = None) -> subprocess.CompletedProcess:
        """`ray job submit --working-dir .` from the repository, as the README says; with an id, without waiting."""
        extra = [] if submission_id is None else ["--no-wait", "--submission-id", submission_id]
        deadline = time.monotonic() + 120
        while True:
            result = self.ray("job", "submit", *extra, "--working-dir", ".", "--", "python", "-m",
                              "pipelines.segment", *job_args, check=False)  # fmt: skip
            # The job server answers before the node's agent that runs jobs is up; it says to try again.
            if NO_AGENT_YET not in result.stderr or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert result.returncode == 0, f"the job failed:\n{result.stdout[-6000:]}\n{result.stderr[-3000:]}"
        return result

    def stop(self) -> None:
        """Workers first, then the head; each is stopped even when another fails to stop."""
        try:
            for worker in self.workers:
                if worker.process.returncode is None:
                    worker.stop()
        finally:
            self.head.stop()


def wait_for(condition: Callable[[], object], timeout_s: float, what: str, interval_s: float = 1.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval_s)
    raise TimeoutError(f"waited {timeout_s} s for {what}")
