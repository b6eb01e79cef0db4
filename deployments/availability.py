"""Answer 503 at once while a stage of the application has had no running replica for a while.

Serve's router waits without end for a replica of a deployment that has none (its `route_and_send_request`
"will block indefinitely if no replicas are available"). When the only node that can hold the model pool
is lost, or a stage's replica cannot start, every request would wait out its whole timeout and end in a
504, which the clients rightly do not retry. So the ingress watches its application's status (the Serve
controller's, once a second), and once a stage has had no RUNNING replica for `unavailable_after_s` it
answers 503 with Retry-After: requests waiting at that moment at once, new ones before they start. A
replica replaced sooner (a crash, a redeploy) keeps its requests waiting, as before.

A stage whose replica failed to start (a checkpoint that cannot be found or loaded) is unavailable at once,
and its start-up error (the exception's last line, as Serve records it in the deployment's status) goes
into the 503 and the readiness answer, so that the caller and the operator see the cause, not only the
controller's log. The application is ready once every stage has a running replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from client.errors import ServiceUnavailableError

logger = logging.getLogger("ray.serve")

T = TypeVar("T")
ReplicaStates = Mapping[str, Mapping[str, int]]  # deployment name -> replica state -> count
POLL_S = 1.0
# The line a Python traceback ends with: the exception's (possibly dotted) class name, then its message.
EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*(?:Error|Exception)):[ ]?", re.MULTILINE)


@dataclass(frozen=True)
class StageReading:
    """One reading of the application's status: replica counts by state, and each stage's last start-up error."""

    replica_states: ReplicaStates
    start_errors: Mapping[str, str] = field(default_factory=dict)


class StageUnavailableError(ServiceUnavailableError):
    """A stage has had no running replica for too long; its wire code stays `unavailable` (HTTP 503)."""


def stages_without_replicas(replica_states: ReplicaStates, own: str) -> frozenset[str]:
    """The deployments other than `own` (the ingress, which is answering) with no RUNNING replica."""
    return frozenset(
        name
        for name, states in replica_states.items()
        if name != own and not sum(count for state, count in states.items() if state == "RUNNING")
    )


def down_since(previous: Mapping[str, float], down: frozenset[str], now: float) -> dict[str, float]:
    """When each stage now down was first seen down; a stage that came back is forgotten."""
    return {name: previous.get(name, now) for name in down}


def unavailable_stages(since: Mapping[str, float], now: float, after_s: float) -> tuple[str, ...]:
    """The stages down for at least `after_s`, sorted so that messages are stable."""
    return tuple(sorted(name for name, first_seen in since.items() if now - first_seen >= after_s))


def start_error(deployment_message: str) -> str | None:
    """The exception a replica's constructor raised, from the traceback Serve puts in the deployment's status
    message: `CheckpointUnavailableError: checkpoint directory '/models/sam3' does not exist`, its message
    whole (it may span lines), its class without the module path. None when the message holds no exception.
    """
    matches = list(EXCEPTION_LINE.finditer(deployment_message))
    if not matches:
        return None
    last = matches[-1]
    return f"{last.group(1)}: {deployment_message[last.end():].strip()}"


def not_ready_reason(down: frozenset[str], start_errors: Mapping[str, str]) -> str | None:
    """Why the application is not ready, stage by stage (stages failing with the same error named together)."""
    if not down:
        return None
    by_error: dict[str | None, list[str]] = {}
    for name in sorted(down):
        by_error.setdefault(start_errors.get(name), []).append(name)
    parts = [
        f"{', '.join(names)} cannot start: {error}" if error else f"no running replica of {', '.join(names)} yet"
        for error, names in by_error.items()
    ]
    return "; ".join(parts)


def serve_stage_reading(app_name: str) -> StageReading:
    """Replica counts and start-up errors for each deployment of `app_name`, from the Serve controller
    (a blocking call)."""
    from ray import serve

    application = serve.status().applications.get(app_name)
    if application is None:
        return StageReading({})
    deployments = application.deployments.items()
    return StageReading(
        replica_states={name: dict(deployment.replica_states) for name, deployment in deployments},
        start_errors={name: error for name, deployment in deployments if (error := start_error(deployment.message))},
    )


class StageWatch:
    """Which stages are unavailable and why, refreshed by polling the controller from the ingress's own
    event loop."""

    def __init__(
        self,
        app_name: str,
        own: str,
        unavailable_after_s: float,
        *,
        read_states: Callable[[], StageReading] | None = None,
        clock: Callable[[], float] = time.monotonic,
        poll_s: float = POLL_S,
    ):
        self.own = own
        self.unavailable_after_s = unavailable_after_s
        self.unavailable: tuple[str, ...] = ()
        self.not_ready_reason: str | None = "the application's status has not been read yet"
        self._read_states = read_states or (lambda: serve_stage_reading(app_name))
        self._clock = clock
        self._poll_s = poll_s
        self._since: dict[str, float] = {}
        self._failed: dict[str, str] = {}
        self._lost = asyncio.Event()
        self._read_once = asyncio.Event()
        self._poller: asyncio.Task | None = None

    @property
    def ready(self) -> bool:
        """Every stage has a running replica (the ingress, answering, is one)."""
        return self.not_ready_reason is None

    def update(self, reading: StageReading) -> None:
        """Take in one reading of the application's status.

        A stage down for `unavailable_after_s` is unavailable; one down whose last start failed is at once.
        """
        now = self._clock()
        down = stages_without_replicas(reading.replica_states, self.own)
        self._since = down_since(self._since, down, now)
        failed = {name: error for name, error in reading.start_errors.items() if name in down}
        unavailable = tuple(sorted({*unavailable_stages(self._since, now, self.unavailable_after_s), *failed}))
        if unavailable != self.unavailable or failed != self._failed:
            logger.warning("stages unavailable: %s", not_ready_reason(frozenset(unavailable), failed) or "none")
        self.unavailable, self._failed = unavailable, failed
        self.not_ready_reason = not_ready_reason(down, reading.start_errors)
        self._read_once.set()
        if unavailable:
            self._lost.set()
        else:
            self._lost.clear()

    async def readiness(self, first_reading_s: float = 5.0) -> str | None:
        """Why the application is not ready, or None when it is. Waits up to `first_reading_s` for the first
        reading, so that a probe never hangs on a controller out of reach."""
        self._start_polling()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._read_once.wait(), timeout=first_reading_s)
        return self.not_ready_reason

    async def guard(self, response: Awaitable[T]) -> T:
        """`response`'s result, or `StageUnavailableError` at once if a stage is or becomes unavailable first."""
        self._start_polling()
        self._raise_if_unavailable()
        waiting = asyncio.ensure_future(response)
        try:
            while True:
                lost = asyncio.ensure_future(self._lost.wait())
                try:
                    await asyncio.wait({waiting, lost}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    lost.cancel()
                if waiting.done():
                    return waiting.result()
                self._raise_if_unavailable()  # else the stage came back before this request woke up: wait on
        finally:
            waiting.cancel()

    def _raise_if_unavailable(self) -> None:
        if not self.unavailable:
            return
        waited = [name for name in self.unavailable if name not in self._failed]
        causes = []
        if waited:
            causes.append(
                f"no running replica of {', '.join(waited)} for {self.unavailable_after_s:.0f} s or more "
                "(a lost node, or a replica that cannot start)"
            )
        if self._failed:
            causes.append(not_ready_reason(frozenset(self._failed), self._failed))
        raise StageUnavailableError(f"{'; '.join(causes)}: retry later")

    def _start_polling(self) -> None:
        if self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        failing = False
        while True:
            try:
                replica_states = await asyncio.to_thread(self._read_states)
            except Exception as error:  # the controller is out of reach: keep the last reading
                if not failing:
                    logger.warning("cannot read the application's status, stage availability unchanged: %r", error)
                failing = True
            else:
                failing = False
                self.update(replica_states)
            await asyncio.sleep(self._poll_s)
