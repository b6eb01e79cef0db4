"""The model pool's batcher, without Ray: batches form when the model can take one, never by waiting."""

from __future__ import annotations

import asyncio

import pytest

from deployments.batcher import ContinuousBatcher


class GatedModel:
    """Records each batch and holds it until the test opens the gate, like a model that is busy."""

    def __init__(self, fail_on: object = None):
        self.batches: list[list] = []
        self.gate = asyncio.Event()
        self.fail_on = fail_on
        self.in_flight = 0
        self.most_in_flight = 0

    async def __call__(self, items: list) -> list:
        self.batches.append(list(items))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await self.gate.wait()
        finally:
            self.in_flight -= 1
        if self.fail_on in items:
            raise ValueError("bad batch")
        return [f"result {item}" for item in items]


async def settle() -> None:
    """Let every ready task run (the dispatcher and the batches it started)."""
    for _ in range(5):
        await asyncio.sleep(0)


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, timeout=10))


def test_a_lone_request_runs_at_once_and_the_backlog_forms_the_next_batch():
    async def scenario():
        model = GatedModel()
        batcher = ContinuousBatcher(model, max_batch_size=4)
        first = asyncio.create_task(batcher.submit(0))
        await settle()
        assert model.batches == [[0]], "the model was idle: no wait for company"
        rest = [asyncio.create_task(batcher.submit(i)) for i in range(1, 7)]
        await settle()
        assert model.batches == [[0]], "one batch in flight at a time"
        assert batcher.queued() == 6
        model.gate.set()
        results = await asyncio.gather(first, *rest)
        assert results == [f"result {i}" for i in range(7)]
        assert model.batches == [[0], [1, 2, 3, 4], [5, 6]], "what queued meanwhile fills the next batches"

    run(scenario())


def test_live_configuration_changes_the_next_batch():
    async def scenario():
        model = GatedModel()
        batcher = ContinuousBatcher(model, max_batch_size=8)
        first = asyncio.create_task(batcher.submit(0))
        await settle()
        rest = [asyncio.create_task(batcher.submit(i)) for i in range(1, 6)]
        await settle()
        batcher.configure(max_batch_size=2, batch_wait_timeout_s=0.0, max_concurrent_batches=1)
        model.gate.set()
        await asyncio.gather(first, *rest)
        assert [len(batch) for batch in model.batches] == [1, 2, 2, 1]

    run(scenario())


def test_two_batches_in_flight_when_allowed():
    async def scenario():
        model = GatedModel()
        batcher = ContinuousBatcher(model, max_batch_size=2, max_concurrent_batches=2)
        tasks = [asyncio.create_task(batcher.submit(i)) for i in range(5)]
        await settle()
        assert model.in_flight == 2
        model.gate.set()
        await asyncio.gather(*tasks)
        assert model.most_in_flight == 2
        assert sorted(item for batch in model.batches for item in batch) == list(range(5))

    run(scenario())


def test_a_cancelled_caller_leaves_the_queue_and_is_never_run():
    async def scenario():
        model = GatedModel()
        batcher = ContinuousBatcher(model, max_batch_size=4)
        first = asyncio.create_task(batcher.submit("busy"))
        await settle()
        gone = asyncio.create_task(batcher.submit("gone"))
        kept = asyncio.create_task(batcher.submit("kept"))
        await settle()
        gone.cancel()
        await settle()
        assert batcher.queued() == 1
        model.gate.set()
        assert await kept == "result kept"
        await first
        assert model.batches == [["busy"], ["kept"]]
        with pytest.raises(asyncio.CancelledError):
            await gone

    run(scenario())


def test_a_failed_batch_fails_its_own_callers_only():
    async def scenario():
        model = GatedModel(fail_on="bad")
        batcher = ContinuousBatcher(model, max_batch_size=2)
        tasks = [asyncio.create_task(batcher.submit(item)) for item in ("ok", "fine", "bad", "beside bad")]
        await settle()
        model.gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert model.batches == [["ok", "fine"], ["bad", "beside bad"]]
        assert results[:2] == ["result ok", "result fine"]
        assert all(isinstance(result, ValueError) for result in results[2:])
        assert batcher.busy_s() > 0

    run(scenario())


def test_a_wait_window_gathers_company_while_the_model_is_idle():
    async def scenario():
        model = GatedModel()
        model.gate.set()
        batcher = ContinuousBatcher(model, max_batch_size=4, batch_wait_timeout_s=5.0)
        first = asyncio.create_task(batcher.submit(1))
        await settle()
        assert model.batches == [], "waiting for company, up to the window"
        rest = [asyncio.create_task(batcher.submit(i)) for i in (2, 3, 4)]
        await asyncio.gather(first, *rest)
        assert model.batches == [[1, 2, 3, 4]], "a full batch goes without waiting out the window"

    run(scenario())


def test_wrong_result_count_is_an_error_for_every_caller_not_a_hang():
    async def too_few(items):
        return items[:-1]

    async def scenario():
        batcher = ContinuousBatcher(too_few, max_batch_size=4, batch_wait_timeout_s=0.05)
        results = await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)
        assert all(isinstance(result, RuntimeError) for result in results)

    run(scenario())


def test_an_idle_batcher_holds_no_task_and_wakes_for_new_work():
    """Nothing keeps an idle batcher (and the model its batches call) alive: multiplexing can unload it."""

    async def scenario():
        model = GatedModel()
        batcher = ContinuousBatcher(model, max_batch_size=4)
        first = asyncio.ensure_future(batcher.submit(1))
        await settle()
        model.gate.set()
        assert await first == "result 1"
        await settle()
        assert batcher._dispatcher.done(), "the dispatcher ends once nothing is queued or running"
        assert await batcher.submit(2) == "result 2"

    asyncio.run(scenario())
