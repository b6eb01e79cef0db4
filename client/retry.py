"""Retries for the clients' transport: capped exponential backoff with full jitter, within the caller's timeout.

Only errors that say "try again later" are retried: `ServiceUnavailableError` (HTTP 503/429, Serve's
back-pressure, a dead or unavailable replica) and `ConnectionFailedError`. A timeout is not: its budget is spent.
An error may carry `retry_after_s` (the server's `Retry-After`), which sets a floor for the next delay.

The logic is written once, as a plan (`retry_plan`): a generator that yields what to do next (`Attempt`,
`Wait`) and is sent each attempt's result or thrown its error. `drive` carries a plan out with blocking calls,
`drive_async` with coroutines, so the blocking and the asyncio clients retry alike.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Awaitable, Generator
from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

from client.errors import ConnectionFailedError, ServiceUnavailableError

logger = logging.getLogger("client")

T = TypeVar("T")

RETRYABLE_ERRORS = (ServiceUnavailableError, ConnectionFailedError)
_MAX_DOUBLINGS = 1000  # 2.0 ** 1024 overflows a float; no call retries that often


@dataclass(frozen=True)
class RetryPolicy:
    """How many retries and how long between them; `retries=0` sends each request once (for non-idempotent use)."""

    retries: int = 3
    backoff_s: float = 0.25
    max_backoff_s: float = 4.0

    def __post_init__(self) -> None:
        if self.retries < 0 or not 0 <= self.backoff_s < math.inf or not 0 <= self.max_backoff_s < math.inf:
            raise ValueError(f"retries, backoff_s and max_backoff_s must be finite and >= 0: {self}")

    def delay(self, attempt: int, retry_after_s: float | None = None) -> float:
        """Full jitter spreads out clients that failed together; a server's Retry-After is a floor, still capped."""
        ceiling = min(self.max_backoff_s, self.backoff_s * 2.0 ** min(attempt, _MAX_DOUBLINGS))
        delay = random.uniform(0, ceiling)
        if retry_after_s is not None:
            delay = max(delay, retry_after_s)
        return min(delay, self.max_backoff_s)


@dataclass(frozen=True)
class Attempt(Generic[T]):
    """A plan's step: make `attempt` with this many seconds left (None: no deadline), send its result back."""

    attempt: T
    remaining_s: float | None


@dataclass(frozen=True)
class Wait:
    """A plan's step: wait this long, then resume the plan."""

    seconds: float


Plan = Generator[Attempt | Wait, Any, T]


def retry_plan(
    attempt: T,
    *,
    policy: RetryPolicy,
    timeout: float | None,
    clock: Callable[[], float] = time.monotonic,
    on_retry: Callable[[Exception], None] | None = None,
) -> Plan:
    """`attempt` until it succeeds or fails for good; no retry starts that would end past `timeout`.

    `on_retry` is called with each error that is retried, before the wait (so a caller can count retries)."""
    deadline = None if timeout is None else clock() + timeout
    remaining, retry = timeout, 0
    while True:
        try:
            return (yield Attempt(attempt, remaining))
        except RETRYABLE_ERRORS as error:
            delay = policy.delay(retry, error.retry_after_s)
            if retry >= policy.retries or (deadline is not None and clock() + delay >= deadline):
                raise
            logger.info(
                "retry %d/%d in %.3f s after %s: %s", retry + 1, policy.retries, delay, type(error).__name__, error
            )
            if on_retry is not None:
                on_retry(error)
            yield Wait(delay)
            if deadline is not None:
                remaining = deadline - clock()
                if remaining <= 0:  # the wait overran the deadline
                    raise
        retry += 1


def drive(plan: Plan, make: Callable[[Any, float | None], Any], sleep: Callable[[float], None] = time.sleep) -> T:
    """Carry out `plan` with blocking calls: `make(attempt, remaining_s)` for each `Attempt`, `sleep` to wait."""
    step = next(plan)
    while True:
        try:
            if isinstance(step, Wait):
                sleep(step.seconds)
                result = None
            else:
                result = make(step.attempt, step.remaining_s)
        except Exception as error:  # the plan decides: retried, or raised again from it
            step = _resume(plan.throw, error)
        else:
            step = _resume(plan.send, result)
        if isinstance(step, _Done):
            return step.value


async def drive_async(
    plan: Plan,
    make: Callable[[Any, float | None], Awaitable[Any]],
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> T:
    """`drive` for asyncio: `await make(attempt, remaining_s)` for each `Attempt`, `await sleep` to wait."""
    step = next(plan)
    while True:
        try:
            if isinstance(step, Wait):
                await sleep(step.seconds)
                result = None
            else:
                result = await make(step.attempt, step.remaining_s)
        except Exception as error:
            step = _resume(plan.throw, error)
        else:
            step = _resume(plan.send, result)
        if isinstance(step, _Done):
            return step.value


@dataclass(frozen=True)
class _Done:
    value: Any


def _resume(resume: Callable[[Any], Attempt | Wait], value: Any) -> Attempt | Wait | _Done:
    """The plan's next step, or `_Done` with what it returned; an error it raises propagates."""
    try:
        return resume(value)
    except StopIteration as finished:
        return _Done(finished.value)


def call_with_retries(
    attempt: Callable[[float | None], T],
    *,
    policy: RetryPolicy,
    timeout: float | None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    on_retry: Callable[[Exception], None] | None = None,
) -> T:
    """`attempt(remaining_s)` under `retry_plan`, with blocking calls."""
    plan = retry_plan(attempt, policy=policy, timeout=timeout, clock=clock, on_retry=on_retry)
    return drive(plan, lambda make, remaining: make(remaining), sleep)
