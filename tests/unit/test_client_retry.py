"""Unit tests for client.retry: the backoff policy and the retry loop, on a fake clock (no real sleeping)."""

from __future__ import annotations

import logging
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from client.errors import (
    AuthenticationError,
    ConnectionFailedError,
    InvalidRequestError,
    RequestTimeoutError,
    Sam3Error,
    ServiceUnavailableError,
)
from client.retry import RetryPolicy, call_with_retries


class FakeClock:
    """Time that passes only when slept or advanced, so retry tests run instantly and exactly."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def upper_jitter(monkeypatch) -> None:
    """Every jittered delay is its upper bound, so delays are exact."""
    monkeypatch.setattr(random, "uniform", lambda low, high: high)


class Attempts:
    """An attempt function that raises the given errors in turn, then returns "ok"; records its budgets."""

    def __init__(self, clock: FakeClock, *errors: Exception, duration_s: float = 0.0) -> None:
        self.clock, self.errors, self.duration_s = clock, list(errors), duration_s
        self.budgets: list[float | None] = []

    def __call__(self, remaining: float | None) -> str:
        self.budgets.append(remaining)
        self.clock.now += self.duration_s
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def run(attempts: Attempts, clock: FakeClock, *, timeout: float | None = None, **policy: float) -> str:
    return call_with_retries(
        attempts, policy=RetryPolicy(**policy), timeout=timeout, sleep=clock.sleep, clock=clock.clock
    )


# The policy


@given(
    attempt=st.integers(min_value=0, max_value=10_000),
    backoff_s=st.floats(min_value=0, max_value=1e6),
    max_backoff_s=st.floats(min_value=0, max_value=1e6),
    retry_after_s=st.none() | st.floats(min_value=0, max_value=1e9),
)
def test_every_delay_is_between_zero_and_the_cap(attempt, backoff_s, max_backoff_s, retry_after_s):
    delay = RetryPolicy(backoff_s=backoff_s, max_backoff_s=max_backoff_s).delay(attempt, retry_after_s)
    assert 0 <= delay <= max_backoff_s


def test_delays_double_from_backoff_s_up_to_the_cap(upper_jitter):
    policy = RetryPolicy(backoff_s=0.25, max_backoff_s=4.0)
    assert [policy.delay(attempt) for attempt in range(7)] == [0.25, 0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_delays_are_fully_jittered():
    random.seed(0)
    delays = [RetryPolicy(backoff_s=1.0).delay(0) for _ in range(200)]
    assert all(0 <= delay <= 1.0 for delay in delays)
    assert min(delays) < 0.1 and max(delays) > 0.9


def test_retry_after_is_a_floor_still_capped():
    policy = RetryPolicy(backoff_s=0.25, max_backoff_s=4.0)
    assert 2.0 <= policy.delay(0, retry_after_s=2.0) <= 4.0
    assert policy.delay(0, retry_after_s=30.0) == 4.0


@pytest.mark.parametrize("values", [{"retries": -1}, {"backoff_s": -0.1}, {"max_backoff_s": float("inf")}])
def test_bad_policies_are_refused(values):
    with pytest.raises(ValueError):
        RetryPolicy(**values)


# The loop


@pytest.mark.parametrize("error", [ServiceUnavailableError("busy"), ConnectionFailedError("refused")])
def test_retryable_errors_are_retried_until_success(clock, error):
    attempts = Attempts(clock, error, error)
    assert run(attempts, clock) == "ok"
    assert len(attempts.budgets) == 3 and len(clock.sleeps) == 2


@pytest.mark.parametrize(
    "error",
    [
        RequestTimeoutError("the budget is spent"),
        InvalidRequestError("bad"),
        AuthenticationError("no key"),
        Sam3Error("internal"),
    ],
)
def test_other_errors_are_raised_at_once(clock, error):
    attempts = Attempts(clock, error)
    with pytest.raises(type(error)) as raised:
        run(attempts, clock)
    assert raised.value is error
    assert (len(attempts.budgets), clock.sleeps) == (1, [])


def test_the_last_error_is_raised_when_retries_run_out(clock):
    errors = [ServiceUnavailableError(f"busy {n}") for n in range(5)]
    attempts = Attempts(clock, *errors)
    with pytest.raises(ServiceUnavailableError) as raised:
        run(attempts, clock, retries=3)
    assert raised.value is errors[3]
    assert len(attempts.budgets) == 4 and len(clock.sleeps) == 3


def test_retries_0_makes_one_attempt(clock):
    attempts = Attempts(clock, ServiceUnavailableError("busy"))
    with pytest.raises(ServiceUnavailableError):
        run(attempts, clock, retries=0)
    assert (len(attempts.budgets), clock.sleeps) == (1, [])


def test_each_attempt_gets_the_time_left(clock, upper_jitter):
    attempts = Attempts(clock, *[ServiceUnavailableError("busy")] * 3, duration_s=0.25)
    assert run(attempts, clock, timeout=4.0, backoff_s=0.25) == "ok"
    assert clock.sleeps == [0.25, 0.5, 1.0]
    assert attempts.budgets == [4.0, 3.5, 2.75, 1.5]


def test_no_retry_starts_that_would_end_past_the_deadline(clock, upper_jitter):
    errors = [ServiceUnavailableError("first"), ServiceUnavailableError("second"), ServiceUnavailableError("third")]
    attempts = Attempts(clock, *errors, duration_s=0.25)
    with pytest.raises(ServiceUnavailableError) as raised:
        run(attempts, clock, timeout=1.0, backoff_s=0.25)
    # 0.25 s attempt, 0.25 s delay, 0.25 s attempt; the next 0.5 s delay would end at 1.25 s > 1.0 s
    assert raised.value is errors[1]
    assert (attempts.budgets, clock.sleeps) == ([1.0, 0.5], [0.25])


def test_a_sleep_that_overruns_the_deadline_ends_the_call(clock):
    def oversleep(seconds: float) -> None:
        clock.now += seconds + 1.0

    error = ConnectionFailedError("refused")
    attempts = Attempts(clock, error)
    with pytest.raises(ConnectionFailedError) as raised:
        call_with_retries(attempts, policy=RetryPolicy(), timeout=1.0, sleep=oversleep, clock=clock.clock)
    assert raised.value is error and len(attempts.budgets) == 1


def test_no_timeout_means_no_deadline(clock, upper_jitter):
    attempts = Attempts(clock, *[ServiceUnavailableError("busy")] * 3, duration_s=100.0)
    assert run(attempts, clock) == "ok"
    assert attempts.budgets == [None] * 4


def test_retry_after_on_the_error_sets_the_delay(clock):
    error = ServiceUnavailableError("busy")
    error.retry_after_s = 1.5
    assert run(Attempts(clock, error), clock, backoff_s=0.25) == "ok"
    assert clock.sleeps == [1.5]


def test_each_retry_is_logged(clock, caplog):
    with caplog.at_level(logging.INFO, logger="client"):
        run(Attempts(clock, ConnectionFailedError("refused")), clock)
    (record,) = caplog.records
    assert record.levelno == logging.INFO
    assert "retry 1/3" in record.getMessage() and "ConnectionFailedError: refused" in record.getMessage()


def test_on_retry_is_told_each_retried_error_and_not_the_last(clock):
    errors = [ServiceUnavailableError(f"busy {n}") for n in range(3)]
    told: list[Exception] = []
    with pytest.raises(ServiceUnavailableError):
        call_with_retries(Attempts(clock, *errors), policy=RetryPolicy(retries=2), timeout=None,
                          sleep=clock.sleep, clock=clock.clock, on_retry=told.append)  # fmt: skip
    assert told == errors[:2]
