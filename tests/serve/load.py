"""A bounded load generator for the Serve tests: callers on threads, every outcome counted."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor


class LoadGenerator:
    """Keeps `concurrency` callers running `call` until stopped; counts answers, wrong answers and failures.

    `call` returns whether the answer was right; an exception is a failed request.
    """

    def __init__(self, call: Callable[[], bool], max_workers: int = 32):
        self.call = call
        self.answered = 0
        self.wrong: int = 0
        self.failures: list[BaseException] = []
        self.concurrency = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=max_workers)

    def _caller(self, index: int) -> None:
        while not self._stop.is_set() and index < self.concurrency:
            try:
                right = self.call()
                with self._lock:
                    self.answered += 1
                    self.wrong += not right
            except Exception as error:  # every failure is recorded and asserted on by the test
                with self._lock:
                    self.failures.append(error)

    def wait_for_answers(self, count: int, timeout_s: float = 180) -> None:
        """Until `count` requests in all have been answered (right or wrong); an `AssertionError` after `timeout_s`.

        Tests wait for answers, which the code guarantees, rather than sleep for a time that gives enough of them
        on an idle machine only.
        """
        deadline = time.monotonic() + timeout_s
        while self.answered < count:
            assert time.monotonic() < deadline, (
                f"{self.answered} of {count} requests answered in {timeout_s} s; {len(self.failures)} failed: "
                f"{self.failures[-3:]}"
            )
            time.sleep(0.1)

    def set_concurrency(self, concurrency: int) -> None:
        """Callers above `concurrency` finish their current request and stop; new ones start."""
        previous, self.concurrency = self.concurrency, concurrency
        for index in range(previous, concurrency):
            self._pool.submit(self._caller, index)

    def stop(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=True)
