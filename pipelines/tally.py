"""What a job did again, counted for its summary line: requests retried, workers restarted, rows redone.

A worker actor lost with its node takes its memory with it, so each worker reports as it goes to one small
actor on the driver's node (a job whose driver's node is lost is lost anyway). Ray restarts a lost worker
wherever its resources are offered, and the restarted worker counts itself. Rows are counted as each batch
starts: a batch that a lost worker was cut short in is counted again when Ray runs it again, so the rows
started beyond the rows written are the rows redone (a batch the worker had not started is not redone).
"""

from __future__ import annotations

from collections import Counter

import ray
from ray.actor import ActorHandle
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


class Tally:
    """Counts by name, added to by the workers and read by the driver once the job is done."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def add(self, counts: dict[str, int]) -> None:
        self.counts.update(counts)

    def read(self) -> Counter[str]:
        return self.counts


def start_tally() -> ActorHandle:
    """The job's `Tally` actor, on this (the driver's) node and asking for no CPU."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(Tally).options(num_cpus=0, scheduling_strategy=here).remote()


def report(tally: ActorHandle | None, **counts: int) -> None:
    """Add to the job's counts and wait until they are added, so no count is lost with its worker after the
    call returns. A worker built outside a job (no tally) counts nothing."""
    if tally is not None and any(counts.values()):
        ray.get(tally.add.remote(counts))


def report_start(tally: ActorHandle | None) -> None:
    """As a worker actor starts: one that Ray restarted (its node was lost) counts as a worker restarted."""
    if tally is not None and ray.get_runtime_context().was_current_actor_reconstructed:
        report(tally, workers_restarted=1)
