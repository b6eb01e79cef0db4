"""Where the image-affinity router sends a request: its image's home replica by rendezvous hashing, or Serve's
power-of-two choice among the replicas that hold its model when the home is overloaded or there is no image."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass
from types import SimpleNamespace

from ray.serve.request_router import PendingRequest, ReplicaID

from deployments.router_registry import replicas_by_model
from deployments.routing import ImageAffinityRouter, home_replica

REPLICAS = [f"replica-{index}" for index in range(4)]
IMAGES = [f"{index:032x}-480x640" for index in range(2000)]


def test_every_router_sends_an_image_to_the_same_replica_whatever_the_order_it_lists_them_in():
    for image in IMAGES[:50]:
        assert home_replica(image, REPLICAS) == home_replica(image, list(reversed(REPLICAS)))


def test_new_images_spread_evenly_over_the_replicas():
    counts = Counter(home_replica(image, REPLICAS) for image in IMAGES)
    assert set(counts) == set(REPLICAS)
    assert all(abs(count - len(IMAGES) / 4) < 0.1 * len(IMAGES) / 4 for count in counts.values()), counts


def test_when_a_replica_goes_only_its_images_move():
    before = {image: home_replica(image, REPLICAS) for image in IMAGES}
    after = {image: home_replica(image, REPLICAS[:-1]) for image in IMAGES}
    moved = [image for image in IMAGES if before[image] != after[image]]
    assert moved and all(before[image] == REPLICAS[-1] for image in moved)
    assert all(before[image] == after[image] for image in IMAGES if before[image] != REPLICAS[-1])


def test_no_replica_no_home():
    assert home_replica(IMAGES[0], []) is None


@dataclass(frozen=True)
class Deployment:
    name: str = "Sam3ModelPool"
    app_name: str = "sam3"


class Replica:
    """What the router and Serve's mixins read of a running replica."""

    def __init__(self, unique_id: str, model_ids: tuple[str, ...] = ("sam3",)):
        self.replica_id = ReplicaID(unique_id=unique_id, deployment_id=Deployment())
        self.node_id = "node-1"
        self.availability_zone = None
        self.multiplexed_model_ids = set(model_ids)
        self.max_ongoing_requests = 32

    async def get_queue_len(self, *, deadline_s: float) -> int:
        return 0


def router_knowing(replicas: list[Replica], app_name: str = "sam3") -> ImageAffinityRouter:
    # The handle's source only tags metrics here ("REPLICA": the ingress's handle).
    source = SimpleNamespace(value="REPLICA")
    router = ImageAffinityRouter(deployment_id=Deployment(app_name=app_name), handle_source=source, self_node_id="node-1")
    router.initialize_state(overloaded_at=4)
    router.update_replicas(replicas)
    return router


def route(
    replicas: list[Replica], image_keys: list[str | None], busy: dict[str, int] | None = None
) -> list[list[list[str]]]:
    """The router's choice for a request of model "sam3" on each image key (None: a request without one), as
    replica ids, in a router that knows `replicas` and, for each id in `busy`, that many requests in flight."""

    async def choose() -> list[list[list[str]]]:
        router = router_knowing(replicas)
        for replica in replicas:
            router.replica_queue_len_cache.update(replica.replica_id, (busy or {}).get(replica.replica_id.unique_id, 0))
        metadata = SimpleNamespace(multiplexed_model_id="sam3")
        requests = [PendingRequest([], {} if key is None else {"image_key": key}, metadata) for key in image_keys]
        chosen = [await router.choose_replicas(replicas, pending) for pending in requests]
        return [[[replica.replica_id.unique_id for replica in rank] for rank in ranks] for ranks in chosen]

    return asyncio.run(choose())


def test_the_router_sends_an_image_to_its_home_among_the_replicas_that_hold_its_model():
    replicas = [Replica("a"), Replica("b"), Replica("c", model_ids=("tuned",))]
    for image in IMAGES[:20]:
        assert route(replicas, [image]) == [[[home_replica(image, ["a", "b"])]]]


def test_an_overloaded_home_or_a_request_without_an_image_gets_two_choices_among_the_holders():
    replicas = [Replica("a"), Replica("b"), Replica("c"), Replica("d", model_ids=("tuned",))]
    image = IMAGES[0]
    home = home_replica(image, ["a", "b", "c"])
    for choices in route(replicas, [image, None] * 10, busy={home: 4}):
        assert len(choices) == 1 and len(choices[0]) == 2 and len(set(choices[0])) == 2
        assert set(choices[0]) <= {"a", "b", "c"}


def test_the_models_each_replica_holds_are_counted_from_the_routers_of_the_application():
    """Two routers of one application (two handles) that know the same replica count it once; another
    application's router is not counted; a replica that reports no model counts for none. (The application
    names are this test's own: other tests' routers may live on in the process until collected.)"""

    async def count() -> tuple[Counter, Counter, Counter]:
        holders = [Replica("a", ("sam3", "tuned")), Replica("b", ("sam3",)), Replica("c", ())]
        routers = [
            router_knowing(holders, "counted"),
            router_knowing(holders[:1], "counted"),
            router_knowing([Replica("x")], "counted-other"),
        ]
        counted = replicas_by_model("counted"), replicas_by_model("counted-other"), replicas_by_model("absent")
        del routers
        return counted

    assert asyncio.run(count()) == (Counter(sam3=2, tuned=1), Counter(sam3=1), Counter())


def route_session(replicas: list[Replica], session_id: str, busy: dict[str, int] | None = None) -> list[list[str]]:
    """The router's choice for a video session's request (no model id: a session names its replica)."""

    async def choose() -> list[list[str]]:
        router = router_knowing(replicas)
        for replica in replicas:
            router.replica_queue_len_cache.update(replica.replica_id, (busy or {}).get(replica.replica_id.unique_id, 0))
        pending = PendingRequest([], {"session_id": session_id}, SimpleNamespace(multiplexed_model_id=""))
        ranks = await router.choose_replicas(replicas, pending)
        return [[replica.replica_id.unique_id for replica in rank] for rank in ranks]

    return asyncio.run(choose())


def test_a_video_session_goes_to_the_replica_its_id_names_even_when_that_one_is_busy():
    replicas = [Replica("a"), Replica("b"), Replica("c")]
    for holder in ("a", "b", "c"):
        assert route_session(replicas, f"{holder}.{'0' * 32}", busy={holder: 100}) == [[holder]]


def test_a_session_whose_replica_is_gone_goes_where_any_request_would():
    replicas = [Replica("a"), Replica("b"), Replica("c")]
    for _ in range(10):
        (choices,) = route_session(replicas, f"gone.{'0' * 32}")
        assert len(choices) == 2 and set(choices) <= {"a", "b", "c"}
