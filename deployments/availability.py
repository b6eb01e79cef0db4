"""Answer 503 at once while a stage of the application has had no running replica for a while.

Serve's router waits without end for a replica of a deployment that has none (its `route_and_send_request`
"will block indefinitely if no replicas are available"). When the only node that can hold the model pool
is lost, or a stage's replica cannot start, every request would wait out its whole timeout and end in a
504, which the clients rightly do not retry. So the ingress watches its application's status (the Serve
controller's, once a second), and once a stage has had no RUNNING replica for `unavailable_after_s` it
answers 503 with Retry-After: requests waiting at that moment at once, new ones before they start. A
replica replaced sooner (a crash, a redeploy) keeps its requests waiting, as before.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

from client.errors import ServiceUnavailableError

logger = logging.getLogger("ray.serve")

T = TypeVar("T")
ReplicaStates = Mapping[str, Mapping[str, int]]  # deployment name -> replica state -> count
POLL_S = 1.0


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


def serve_replica_states(app_name: str) -> dict[str, dict[str, int]]:
    """Replica counts by state for each deployment of `app_name`, from the Serve controller (a blocking call)."""
    from ray import serve

    application = serve.status().applications.get(app_name)
    if application is None:
        return {}
    return {name: dict(deployment.replica_states) for name, deployment in application.deployments.items()}


class StageWatch:
    """Which stages are unavailable, refreshed by polling the controller from the ingress's own event loop."""

    def __init__(
        self,
        app_name: str,
        own: str,
        unavailable_after_s: float,
        *,
        read_states: Callable[[], ReplicaStates] | None = None,
        clock: Callable[[], float] = time.monotonic,
        poll_s: float = POLL_S,
    ):
        self.own = own
        self.unavailable_after_s = unavailable_after_s
        self.unavailable: tuple[str, ...] = ()
        self._read_states = read_states or (lambda: serve_replica_states(app_name))
        self._clock = clock
        self._poll_s = poll_s
        self._since: dict[str, float] = {}
        self._lost = asyncio.Event()
        self._poller: asyncio.Task | None = None

    def update(self, replica_states: ReplicaStates) -> None:
        """Take in one reading of the application's replica states."""
        now = self._clock()
        self._since = down_since(self._since, stages_without_replicas(replica_states, self.own), now)
        unavailable = unavailable_stages(self._since, now, self.unavailable_after_s)
        if unavailable != self.unavailable:
            logger.warning("stages without a running replica for %.0f s or more: %s", self.unavailable_after_s,
                           ", ".join(unavailable) or "none")  # fmt: skip
        self.unavailable = unavailable
        if unavailable:
            self._lost.set()
        else:
            self._lost.clear()

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
        if self.unavailable:
            raise StageUnavailableError(
                f"no running replica of {', '.join(self.unavailable)} for {self.unavailable_after_s:.0f} s or more "
                "(a lost node, or a replica that cannot start): retry later"
            )

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
