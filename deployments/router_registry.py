"""The model pool's request routers in this process, and what they know of its replicas: which models each holds.

Apart from `deployments.routing` on purpose: Serve pickles a request router's module by value, so the router
class a handle builds has its own copy of that module's globals, and a registry kept there is not the one the
ingress would read. This module is pickled by reference: the routers and the ingress share it.
"""

from __future__ import annotations

import weakref
from collections import Counter

from ray.serve.request_router import RequestRouter

# Serve makes the routers, and drops them with their handles.
_ROUTERS: weakref.WeakSet[RequestRouter] = weakref.WeakSet()


def register(router: RequestRouter) -> None:
    _ROUTERS.add(router)


def replicas_by_model(app_name: str) -> Counter[str]:
    """How many of `app_name`'s model replicas hold (or are loading) each model, as this process's routers last
    heard it from Serve's controller, to which replicas report each model they load and unload. The same
    knowledge routes requests by model; empty until a router of this process has heard of a replica."""
    held: dict[str, frozenset[str]] = {}
    for router in list(_ROUTERS):
        if router.app_name == app_name:
            for replica_id, replica in list(router.curr_replicas.items()):
                held[replica_id.unique_id] = frozenset(replica.multiplexed_model_ids)
    return Counter(model_id for models in held.values() for model_id in models)
