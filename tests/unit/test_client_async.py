"""What only the asyncio client has: coroutines sharing one client in one event loop, `run_many` as an async
iterator with a bound on what is in flight, and `async with`. Its requests, answers, errors, retries and image
ids are held by the blocking client's own tests (`test_client_http.py`, `test_client_image_ids.py`), which run
against both clients.
"""

from __future__ import annotations

import asyncio
import io

import httpx
import numpy as np
import pytest

from client import AsyncSam3HttpClient, InvalidImageError, InvalidPromptError, Sam3Error
from client.protocol import SegmentRequest
from tests.unit.test_client_http import BASE_URL, FakeService, masks_and_response

HEIGHTS = list(range(2, 22))


def image(height: int) -> np.ndarray:
    return np.full((height, 3, 3), height, np.uint8)


class SlowService(FakeService):
    """Answers each segment request after a pause, with a mask of its image's height; counts what is in flight."""

    def __init__(self, pause_s: float = 0.05) -> None:
        super().__init__()
        self.pause_s = pause_s
        self.in_flight = self.max_in_flight = 0

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if not request.url.path.endswith("/v1/segment"):
            return self(request)
        self.requests.append(request)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.pause_s)
        finally:
            self.in_flight -= 1
        sent = SegmentRequest.model_validate_json(request.content)
        height = int(np.load(io.BytesIO(sent.image)).shape[0])
        _, response = masks_and_response(height=height, width=3)
        return httpx.Response(200, content=response.model_dump_json())


def client_of(service: SlowService) -> AsyncSam3HttpClient:
    return AsyncSam3HttpClient(BASE_URL, transport=httpx.MockTransport(service.handle))


def test_tasks_of_one_event_loop_share_one_client_and_each_gets_its_answer():
    service = SlowService()

    async def main() -> list[np.ndarray]:
        async with client_of(service) as client:
            return await asyncio.gather(*(client.run(image(height), text="cat") for height in HEIGHTS))

    masks = asyncio.run(main())
    assert [mask.shape for mask in masks] == [(height, 3) for height in HEIGHTS]
    assert service.max_in_flight > 1, "the calls waited on the network together, not one after another"


@pytest.mark.parametrize("concurrency", [1, 4])
def test_run_many_is_an_async_iterator_in_input_order_with_at_most_concurrency_in_flight(concurrency):
    service = SlowService()

    async def main() -> list:
        async with client_of(service) as client:
            return [mask async for mask in client.run_many(map(image, HEIGHTS), text="cat", concurrency=concurrency)]

    masks = asyncio.run(main())
    assert [mask.shape[0] for mask in masks] == HEIGHTS
    assert service.max_in_flight <= concurrency, "the bound held"
    assert service.max_in_flight > 1 or concurrency == 1, "calls overlapped: each one waits 50 ms on the service"


def test_run_many_puts_each_failure_in_its_place():
    service = SlowService()

    async def main() -> list:
        async with client_of(service) as client:
            images = [image(2), "missing.png", image(3)]
            return [answer async for answer in client.run_many_with_detections(images, text="cat")]

    first, missing, third = asyncio.run(main())
    assert first["union_mask"].shape == (2, 3) and third["union_mask"].shape == (3, 3)
    assert isinstance(missing, InvalidImageError) and "missing.png" in str(missing)
    assert missing.__traceback__ is None, "a kept error holds no frames (and no image) alive"


def test_a_bad_prompt_raises_from_the_call_before_any_image_is_read():
    service, pulled = SlowService(), []

    def images():
        pulled.append(1)
        yield image(2)

    async def main() -> None:
        async with client_of(service) as client:
            with pytest.raises(InvalidPromptError, match="labels are required"):
                client.run_many(images(), points=[[1, 1]])

    asyncio.run(main())
    assert pulled == [] and service.requests == []


def test_leaving_run_many_early_cancels_what_is_in_flight():
    service = SlowService()

    async def main() -> list:
        async with client_of(service) as client:
            async for answer in client.run_many(map(image, HEIGHTS), text="cat", concurrency=4):
                assert not isinstance(answer, Sam3Error)
                break
            await asyncio.sleep(0.1)
            return [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]

    assert asyncio.run(main()) == []
    assert len(service.requests) <= 5, "no image past the window was sent"


def test_async_with_closes_the_connection_pool():
    async def main() -> AsyncSam3HttpClient:
        async with client_of(SlowService()) as client:
            assert await client.health()
        return client

    client = asyncio.run(main())
    assert client._http.is_closed and client._image_http.is_closed
