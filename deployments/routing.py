"""Cache-aware request routing for the model pool: a request goes to the replica that holds its image's features.

Every image has a home among the replicas that hold the request's model: the replica that ranks first for
the image's id by rendezvous hashing (`home_replica`). The first request on an image goes there and leaves
its vision features there, and so does every follow-up, from any ingress replica and without shared state.
Distinct images spread over the replicas as evenly as a hash does, and when replicas come or go only the
images homed on them move. A home with `overloaded_at` requests or more in flight is passed over for Serve's
power-of-two choice (as Serve's default router makes it, through the public routing mixins), as is a request
with no image id. A video session's requests go to the replica that holds it, named in the session's id.

Configured on the model pool in `serve_config.yaml`:

    request_router_config:
      request_router_class: deployments.routing:ImageAffinityRouter
      request_router_kwargs: {overloaded_at: 16}
"""

from __future__ import annotations

import hashlib
import random
from typing import Sequence

from ray.serve.request_router import LocalityMixin, MultiplexMixin, PendingRequest, RequestRouter, RunningReplica

import deployments.router_registry as router_registry  # a module, so Serve pickles it by reference

IMAGE_KEY_ARGUMENT = "image_key"  # the keyword argument of `Sam3ModelPool.run` that names the image
SESSION_ARGUMENT = "session_id"  # the keyword argument of the model pool's video session methods


def rendezvous_rank(image_key: str, replica_id: str) -> bytes:
    return hashlib.blake2b(f"{image_key}|{replica_id}".encode(), digest_size=8).digest()


def home_replica(image_key: str, replica_ids: Sequence[str]) -> str | None:
    """The replica an image belongs to: the same for every router that sees the same replicas."""
    return max(replica_ids, key=lambda replica_id: rendezvous_rank(image_key, replica_id), default=None)


class ImageAffinityRouter(LocalityMixin, MultiplexMixin, RequestRouter):
    """No FIFO mixin: Serve's FIFO routing hands a chosen replica to the oldest waiting request, which may be
    another image's; here each request gets the replica chosen for it."""

    def initialize_state(self, overloaded_at: int = 16) -> None:
        self.overloaded_at = overloaded_at
        router_registry.register(self)

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        self._forget_routed_requests(pending_request)
        holder = self._session_holder(candidate_replicas, pending_request)
        if holder is not None:
            return [[holder]]
        home = self._home(candidate_replicas, pending_request)
        if home is not None and not self._overloaded(home):
            return [[home]]
        return self._two_choices(candidate_replicas, pending_request)

    def _forget_routed_requests(self, pending_request: PendingRequest | None) -> None:
        """Drop the requests already routed from the multiplex mixin's index of pending requests by model.

        The mixin adds every request that names a model to that index, and Serve (2.60) prunes it only when its
        FIFO matching looks a model up, which a router without the FIFO mixin never does. Left alone, the index
        keeps every request and its arguments (the preprocessor's response, so the prepared image itself) for
        as long as the ingress runs: about 40 kB per request at 112 px, 3 MB at 1008 px. The mixin's own lookup
        prunes the routed requests at the front of the model's queue, up to the oldest still waiting.
        """
        if pending_request is not None and pending_request.metadata.multiplexed_model_id:
            self._get_pending_request_matching_multiplexed_model_id(pending_request.metadata)

    def _two_choices(
        self, candidates: list[RunningReplica], pending_request: PendingRequest | None
    ) -> list[list[RunningReplica]]:
        """Two replicas at random among those the mixins prefer: replicas that hold the request's model (with
        Serve's own fallback when none has for a while), else those nearest this router. Serve sends the
        request to the one with the shorter queue."""
        if pending_request is not None and pending_request.metadata.multiplexed_model_id:
            preferred = self.apply_multiplex_routing(pending_request=pending_request)
        else:
            preferred = self.apply_locality_routing(pending_request=pending_request)
        choices = [replica for replica in candidates if replica.replica_id in preferred]
        return [random.sample(choices, k=min(2, len(choices)))] if choices else []

    @staticmethod
    def _session_holder(candidates: list[RunningReplica], pending_request: PendingRequest | None) -> RunningReplica | None:
        """The replica a video session's id names, loaded or not: only it holds the session. When it is gone, the
        request goes where any would, and the replica there answers that the session is not found."""
        session_id = pending_request.kwargs.get(SESSION_ARGUMENT) if pending_request is not None else None
        if not session_id:
            return None
        holder = session_id.rpartition(".")[0]
        return next((replica for replica in candidates if replica.replica_id.unique_id == holder), None)

    def _home(self, candidates: list[RunningReplica], pending_request: PendingRequest | None) -> RunningReplica | None:
        image_key = pending_request.kwargs.get(IMAGE_KEY_ARGUMENT) if pending_request is not None else None
        if not image_key:
            return None
        model_id = pending_request.metadata.multiplexed_model_id
        holders = {
            replica.replica_id.unique_id: replica
            for replica in candidates
            if not model_id or model_id in replica.multiplexed_model_ids
        }
        home = home_replica(image_key, list(holders))
        return None if home is None else holders[home]

    def _overloaded(self, replica: RunningReplica) -> bool:
        """Requests in flight on it, as this router last knew them (unknown counts as not overloaded)."""
        in_flight = self.replica_queue_len_cache.get(replica.replica_id)
        return in_flight is not None and in_flight >= min(self.overloaded_at, replica.max_ongoing_requests)

