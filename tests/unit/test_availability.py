"""The ingress's stage watch without Ray: a stage with no running replica for long enough gives 503s at once."""

from __future__ import annotations

import asyncio

import pytest
from ray.exceptions import ObjectLostError, OwnerDiedError

from client.errors import ServiceUnavailableError
from client.handle_client import as_sam3_error as client_error
from deployments.availability import (
    StageReading,
    StageUnavailableError,
    StageWatch,
    down_since,
    not_ready_reason,
    stages_without_replicas,
    start_error,
    unavailable_stages,
)
from deployments.errors import as_sam3_error as server_error

INGRESS = "Sam3Ingress"
UP = {INGRESS: {"RUNNING": 1}, "Sam3ModelPool": {"RUNNING": 1}, "Sam3Preprocessor": {"RUNNING": 2}}
MODEL_DOWN = {**UP, "Sam3ModelPool": {"STARTING": 1, "STOPPING": 1}}


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, timeout=10))


def test_stages_without_a_running_replica_leave_out_the_ingress():
    assert stages_without_replicas(UP, INGRESS) == frozenset()
    assert stages_without_replicas(MODEL_DOWN, INGRESS) == {"Sam3ModelPool"}
    assert stages_without_replicas({INGRESS: {}, "Sam3ModelPool": {}}, INGRESS) == {"Sam3ModelPool"}
    assert stages_without_replicas({"Sam3ModelPool": {"RUNNING": 0, "STARTING": 2}}, INGRESS) == {"Sam3ModelPool"}


def test_a_stage_counts_as_down_from_when_it_was_first_seen_down_until_it_is_back():
    since = down_since({}, frozenset({"b"}), now=10.0)
    since = down_since(since, frozenset({"a", "b"}), now=15.0)
    assert since == {"a": 15.0, "b": 10.0}
    assert unavailable_stages(since, now=39.0, after_s=30) == ()
    assert unavailable_stages(since, now=40.0, after_s=30) == ("b",)
    assert unavailable_stages(since, now=45.0, after_s=30) == ("a", "b")
    assert down_since(since, frozenset({"a"}), now=50.0) == {"a": 15.0}
    assert unavailable_stages(down_since(since, frozenset(), now=50.0), now=99.0, after_s=0) == ()


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Status:
    """What the controller says now: the watch's background poll reads it too, so tests set it before updating."""

    def __init__(self) -> None:
        self.states = UP

    def __call__(self):
        return StageReading(self.states)

    def set(self, stages: StageWatch, states) -> None:
        self.states = states
        stages.update(StageReading(states))


def watch(clock: Clock, status: Status, after_s: float = 30.0) -> StageWatch:
    return StageWatch("sam3", INGRESS, after_s, read_states=status, clock=clock, poll_s=0.01)


def test_a_stage_down_for_less_than_the_grace_keeps_requests_waiting():
    clock, status = Clock(), Status()
    stages = watch(clock, status)
    status.set(stages, MODEL_DOWN)
    clock.now = 29.0
    status.set(stages, MODEL_DOWN)
    assert stages.unavailable == ()

    async def answer():
        return "answer"

    assert run(stages.guard(answer())) == "answer"


def test_a_stage_down_past_the_grace_fails_new_requests_at_once_until_it_is_back():
    clock, status = Clock(), Status()
    stages = watch(clock, status)
    status.set(stages, MODEL_DOWN)
    clock.now = 30.0
    status.set(stages, MODEL_DOWN)
    started = []

    async def answer():
        started.append(True)
        return "answer"

    never_sent = answer()
    with pytest.raises(StageUnavailableError, match="Sam3ModelPool") as raised:
        run(stages.guard(never_sent))
    never_sent.close()
    assert raised.value.http_status == 503 and raised.value.code == "unavailable" and not started
    status.set(stages, UP)
    assert run(stages.guard(answer())) == "answer"


def test_a_waiting_request_is_answered_503_as_soon_as_its_stage_is_found_unavailable():
    status = Status()
    stages = watch(Clock(), status, after_s=0)
    cancelled = []

    async def never_answers():
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async def scenario():
        waiting = asyncio.ensure_future(stages.guard(never_answers()))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        status.set(stages, MODEL_DOWN)
        with pytest.raises(StageUnavailableError):
            await waiting

    run(scenario())
    assert cancelled, "the wait for the lost stage's answer is cancelled"


def test_the_answer_and_the_chain_s_own_errors_pass_through():
    stages = watch(Clock(), Status())

    async def fails():
        raise ValueError("bad item")

    with pytest.raises(ValueError, match="bad item"):
        run(stages.guard(fails()))


def test_the_watch_polls_the_status_and_survives_a_controller_out_of_reach():
    class Unreachable(Status):
        def __init__(self) -> None:
            self.readings = iter([RuntimeError("controller unreachable"), MODEL_DOWN])

        def __call__(self):
            reading = next(self.readings, MODEL_DOWN)
            if isinstance(reading, Exception):
                raise reading
            return StageReading(reading)

    stages = watch(Clock(), Unreachable(), after_s=0)

    async def never_answers():
        await asyncio.sleep(3600)

    with pytest.raises(StageUnavailableError):
        run(stages.guard(never_answers()))


def test_a_lost_stage_crosses_the_handle_as_a_plain_service_unavailable_error():
    error = client_error(StageUnavailableError("no running replica of Sam3ModelPool"))
    assert type(error) is ServiceUnavailableError and "Sam3ModelPool" in error.message


@pytest.mark.parametrize("lost", [ObjectLostError("ab" * 14, None, ""), OwnerDiedError("ab" * 14, None, "")])
def test_an_intermediate_result_lost_with_its_node_is_a_503(lost):
    error = server_error(lost)
    assert type(error) is ServiceUnavailableError and error.http_status == 503


# The end of the message Serve 2.60 gave a deployment whose constructor raised (after `Traceback ...`).
FAILED_START = """The deployment failed to start 1 times in a row. Error:
ray::ServeReplica:sam3:Sam3ModelPool.initialize_and_get_metadata() (pid=1, ip=127.0.0.1)
  File "/work/main/sam3_serve_core/checkpoint.py", line 123, in _from_pretrained
    raise CheckpointUnavailableError(f"checkpoint directory {checkpoint!r} does not exist")
sam3_serve_core.checkpoint.CheckpointUnavailableError: could not load 'facebook/sam3' (We couldn't connect.
Check your internet connection.) Set `checkpoint` to the local directory instead of the hub name."""
CAUSE = (
    "CheckpointUnavailableError: could not load 'facebook/sam3' (We couldn't connect.\n"
    "Check your internet connection.) Set `checkpoint` to the local directory instead of the hub name."
)
STARTING = {INGRESS: {"RUNNING": 1}, "Sam3ModelPool": {"STARTING": 1}, "Sam3Preprocessor": {"STARTING": 1}}


def test_the_start_error_is_the_traceback_s_exception_whole_without_its_module():
    assert start_error(FAILED_START) == CAUSE
    assert start_error("Deployment 'Sam3ModelPool' has 1 replicas that have taken more than 30s to initialize.") is None
    assert start_error("") is None


def test_not_ready_names_the_stages_and_groups_those_failing_alike():
    assert not_ready_reason(frozenset(), {}) is None
    assert not_ready_reason(frozenset({"B", "A"}), {}) == "no running replica of A, B yet"
    reason = not_ready_reason(frozenset({"Sam3ModelPool", "Sam3Preprocessor", "Sam3Postprocessor"}),
                              {"Sam3ModelPool": CAUSE, "Sam3Preprocessor": CAUSE})  # fmt: skip
    assert reason == f"Sam3ModelPool, Sam3Preprocessor cannot start: {CAUSE}; no running replica of Sam3Postprocessor yet"


def test_readiness_waits_for_the_first_reading_then_follows_the_stages():
    status = Status()
    status.states = STARTING
    stages = watch(Clock(), status)

    async def readings():
        first = await stages.readiness()
        status.set(stages, UP)
        return first, await stages.readiness(), stages.ready

    first, then, ready = run(readings())
    assert first == "no running replica of Sam3ModelPool, Sam3Preprocessor yet"
    assert (then, ready) == (None, True)


def test_a_stage_that_failed_to_start_is_unavailable_at_once_with_its_cause():
    clock, status = Clock(), Status()
    stages = watch(clock, status)
    failed = StageReading(STARTING, start_errors={"Sam3ModelPool": CAUSE, "Sam3Preprocessor": CAUSE})
    stages.update(failed)
    assert stages.unavailable == ("Sam3ModelPool", "Sam3Preprocessor") and not stages.ready
    assert CAUSE in stages.not_ready_reason

    async def answer():
        return "answer"

    never_sent = answer()
    with pytest.raises(StageUnavailableError) as raised:
        run(stages.guard(never_sent))
    never_sent.close()
    assert raised.value.message == f"Sam3ModelPool, Sam3Preprocessor cannot start: {CAUSE}: retry later"


def test_a_start_error_left_in_the_status_of_a_running_stage_is_ignored():
    stages = watch(Clock(), Status())
    stages.update(StageReading(UP, start_errors={"Sam3ModelPool": CAUSE}))
    assert stages.unavailable == () and stages.ready


def test_readiness_never_hangs_on_a_controller_out_of_reach():
    def unreachable():
        raise RuntimeError("controller unreachable")

    stages = StageWatch("sam3", INGRESS, 30.0, read_states=unreachable, poll_s=0.01)
    assert run(stages.readiness(first_reading_s=0.1)) == "the application's status has not been read yet"
