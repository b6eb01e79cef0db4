"""Where the image-affinity router sends an image: its home replica by rendezvous hashing."""

from __future__ import annotations

from collections import Counter

from deployments.routing import home_replica

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
