"""The vision-feature cache through the real application, with two model replicas and the image-affinity router.

On the tiny checkpoint (random weights: its masks are meaningless, only agreement matters), CPU profile.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from ray import serve

from client import SegmentRequest
from client.errors import ImageNotCachedError
from client.images import encode_image
from client.protocol import SEGMENT_PATH, SegmentResponse
from sam3_serve_core.checkpoint import load_sam3
from sam3_serve_core.pipeline import Sam3Pipeline
from tests.answers import assert_close_answer, assert_same_answer, expect
from tests.conftest import random_image
from tests.serve.app_runner import APP_NAME, cpu_config, deployment, serve_run
from tests.serve.app_runner import replica_stats as all_replica_stats

MODEL_REPLICAS = 2
SESSIONS = 24  # distinct images: enough that a hash leaves each replica at least 4 (fails ~3 in 10,000 runs)
FOLLOW_UPS = 3
PROMPTS = [{"text": "cat"}, {"points": [[40, 30]], "labels": [1]}, {"boxes": [[10, 12, 70, 60]], "labels": [1]}]


@pytest.fixture(scope="module")
def app_url(ray_address, serve_port, tiny112_dir, tmp_path_factory):
    config = cpu_config(str(tiny112_dir), serve_port)
    pool = deployment(config, "Sam3ModelPool")
    # Fixed at two: min = max (the decorator's autoscaling_config would outlive a plain num_replicas).
    pool["autoscaling_config"].update(min_replicas=MODEL_REPLICAS, max_replicas=MODEL_REPLICAS)
    yield serve_run(config, tmp_path_factory.mktemp("serve") / "config.yaml", ray_address)
    serve.delete(APP_NAME)


@pytest.fixture(scope="module")
def http(app_url):
    with httpx.Client(base_url=app_url, timeout=60) as client:
        yield client


def post(http: httpx.Client, **fields) -> httpx.Response:
    return http.post(SEGMENT_PATH, content=SegmentRequest(**fields).model_dump_json(), headers={"content-type": "application/json"})


def answer(http: httpx.Client, **fields) -> SegmentResponse:
    response = post(http, **fields)
    assert response.status_code == 200, response.text
    return SegmentResponse.model_validate_json(response.content)


def replica_stats() -> dict[str, dict]:
    return {replica: stats["vision_cache"]["sam3"] for replica, stats in all_replica_stats(MODEL_REPLICAS).items()}


def total(stats: dict[str, dict], field: str) -> int:
    return sum(replica[field] for replica in stats.values())


def same_answer(first: SegmentResponse, second: SegmentResponse) -> bool:
    return first.model_dump(exclude={"timings_ms"}) == second.model_dump(exclude={"timings_ms"})


@pytest.mark.parametrize("prompt", PROMPTS, ids=["text", "points", "boxes"])
def test_an_answer_from_the_cache_equals_the_cold_one_and_the_in_process_pipeline(http, tiny112_dir, prompt):
    """The cold request encodes a new image; the warm one (its bytes again) and the one by `image_id` are
    answered from the features it cached (both counted as hits), one request at a time: the same computation,
    so the same bits. Against the in-process pipeline, within the bounds (`tests/answers.py`)."""
    image = random_image(75, 110, seed=PROMPTS.index(prompt))
    encoded = encode_image(image, timeout=None)
    before = replica_stats()
    cold = answer(http, image=encoded, **prompt)
    assert cold.image_id is not None and cold.image_id.endswith("-75x110")
    warm = answer(http, image=encoded, **prompt)
    by_id = answer(http, image_id=cold.image_id, **prompt)
    after = replica_stats()
    assert (total(after, "misses") - total(before, "misses"), total(after, "hits") - total(before, "hits")) == (1, 2)
    assert warm.image_id == by_id.image_id == cold.image_id
    assert same_answer(cold, warm) and same_answer(cold, by_id)
    assert_same_answer(warm, cold)
    expected = expect(Sam3Pipeline(load_sam3(str(tiny112_dir))), image, **prompt)
    assert expected.at_threshold().union_mask.any(), "an empty expected mask would make the comparison say little"
    assert_close_answer(cold, expected)


def test_follow_ups_go_to_the_replica_that_holds_the_image_and_new_images_spread(http):
    """Sessions interleave: every image first, then its follow-ups in shuffled order, eight at a time."""
    before = replica_stats()
    images = [encode_image(random_image(64 + index, 96, seed=500 + index), timeout=None) for index in range(SESSIONS)]
    with ThreadPoolExecutor(8) as pool:
        firsts = list(pool.map(lambda image: answer(http, image=image, text="cat"), images))
        follow_ups = [(index, round_) for index in range(SESSIONS) for round_ in range(FOLLOW_UPS)]
        random.Random(0).shuffle(follow_ups)

        def follow_up(job: tuple[int, int]) -> SegmentResponse:
            index, round_ = job
            if round_ == 0:  # the image again, as a client that does not use ids sends it
                return answer(http, image=images[index], **PROMPTS[1])
            return answer(http, image_id=firsts[index].image_id, **PROMPTS[round_ % len(PROMPTS)])

        list(pool.map(follow_up, follow_ups))
    after = replica_stats()
    hits = total(after, "hits") - total(before, "hits")
    misses = total(after, "misses") - total(before, "misses")
    assert misses == SESSIONS and hits == SESSIONS * FOLLOW_UPS, "every follow-up reached its image's replica"
    new_images = {replica: after[replica]["images_held"] - before[replica]["images_held"] for replica in after}
    assert sum(new_images.values()) == SESSIONS
    assert min(new_images.values()) >= 4, f"new images spread over the replicas: {new_images}"


def test_an_image_id_no_replica_holds_is_a_typed_404_that_says_to_send_the_image(http, handle_client):
    unknown = "0" * 32 + "-75x110"
    response = post(http, image_id=unknown, text="cat")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "image_not_cached"
    (error,) = handle_client.segment_many([SegmentRequest(image_id=unknown, text="cat")])
    assert isinstance(error, ImageNotCachedError)


def test_a_malformed_image_id_or_both_image_and_id_are_refused(http):
    image = encode_image(random_image(40, 40, seed=1), timeout=None)
    for body in ({"image_id": "not-an-id", "text": "cat"}, {"image": image, "image_id": "0" * 32 + "-40x40", "text": "cat"}):
        response = http.post(SEGMENT_PATH, content=SegmentRequest.model_construct(**body).model_dump_json(), headers={"content-type": "application/json"})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "invalid_request"
