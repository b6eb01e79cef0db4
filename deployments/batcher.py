"""Dynamic batching that forms a batch when the model can take one (Ray-free asyncio, unit-tested alone).

`@serve.batch` forms the next batch while the previous one still runs, so under load a batch holds only
what arrived during its short wait window and the backlog waits behind it in small batches; and with a
wait window every lone request pays the whole window. Here a batch is formed when a model slot frees:
everything that queued meanwhile goes in (up to `max_batch_size`), and a request that finds the model
idle runs at once. `batch_wait_timeout_s` (0 by default) is how long the oldest queued request may wait
for company while a slot is free, for models where a fuller batch is worth that latency.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class ContinuousBatcher(Generic[Item, Result]):
    """Queues items, runs them in batches through `run_batch` (one result per item, in order)."""

    def __init__(
        self,
        run_batch: Callable[[list[Item]], Awaitable[list[Result]]],
        *,
        max_batch_size: int,
        batch_wait_timeout_s: float = 0.0,
        max_concurrent_batches: int = 1,
    ):
        self._run_batch = run_batch
        self._queue: deque[tuple[Item, asyncio.Future, float]] = deque()
        self._changed: asyncio.Event | None = None
        self._dispatcher: asyncio.Task | None = None
        self._running = 0
        self._tasks: set[asyncio.Task] = set()  # strong references, so running batches are not collected
        self._busy_s = 0.0
        self._busy_since: float | None = None
        self.configure(max_batch_size, batch_wait_timeout_s, max_concurrent_batches)

    def configure(self, max_batch_size: int, batch_wait_timeout_s: float, max_concurrent_batches: int) -> None:
        """Takes effect from the next batch formed (a live `user_config` change)."""
        if max_batch_size < 1 or max_concurrent_batches < 1 or batch_wait_timeout_s < 0:
            raise ValueError("max_batch_size and max_concurrent_batches must be >= 1, batch_wait_timeout_s >= 0")
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self.max_concurrent_batches = max_concurrent_batches
        self._notify()

    async def submit(self, item: Item) -> Result:
        """The item's result; a caller cancelled while its item is queued takes it out of the queue."""
        future = asyncio.get_running_loop().create_future()
        self._queue.append((item, future, time.monotonic()))
        self._ensure_dispatcher()
        self._notify()
        try:
            return await future
        except asyncio.CancelledError:
            future.cancel()
            raise

    def busy_s(self) -> float:
        """Seconds during which at least one batch was running, since start."""
        ongoing = time.monotonic() - self._busy_since if self._busy_since is not None else 0.0
        return self._busy_s + ongoing

    def queued(self) -> int:
        return sum(not future.done() for _, future, _ in self._queue)

    def _ensure_dispatcher(self) -> None:
        if self._dispatcher is None or self._dispatcher.done():
            self._changed = asyncio.Event()
            self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch())

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()

    async def _wait_for_change(self, timeout_s: float | None = None) -> None:
        self._changed.clear()
        try:
            await asyncio.wait_for(self._changed.wait(), timeout_s)
        except TimeoutError:
            pass

    async def _dispatch(self) -> None:
        """Runs while there is work: an idle batcher holds no task, so nothing keeps an unloaded model alive."""
        while True:
            self._drop_cancelled()
            if not self._queue and not self._running:
                return
            if self._running >= self.max_concurrent_batches or not self._queue:
                await self._wait_for_change()
                continue
            waited_s = time.monotonic() - self._queue[0][2]
            if len(self._queue) < self.max_batch_size and waited_s < self.batch_wait_timeout_s:
                await self._wait_for_change(self.batch_wait_timeout_s - waited_s)
                continue
            batch = [self._queue.popleft() for _ in range(min(self.max_batch_size, len(self._queue)))]
            self._started()
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _drop_cancelled(self) -> None:
        live = [entry for entry in self._queue if not entry[1].done()]
        if len(live) != len(self._queue):
            self._queue = deque(live)

    async def _run(self, batch: list[tuple[Item, asyncio.Future, float]]) -> None:
        try:
            results = await self._run_batch([item for item, _, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} items")
            for (_, future, _), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)
        except Exception as error:  # every waiting caller gets the failure, none hangs
            for _, future, _ in batch:
                if not future.done():
                    future.set_exception(error)
        finally:
            self._finished()

    def _started(self) -> None:
        if self._running == 0:
            self._busy_since = time.monotonic()
        self._running += 1

    def _finished(self) -> None:
        self._running -= 1
        if self._running == 0 and self._busy_since is not None:
            self._busy_s += time.monotonic() - self._busy_since
            self._busy_since = None
        self._notify()
