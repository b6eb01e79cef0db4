"""One answer per request, a failed one in its place (Triton's rule): the requests that can still run, run
together, and each earlier failure keeps its slot. Plain Python with no torch, so the job's rows use it too."""

from __future__ import annotations

from typing import Iterable, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def passing(slots: list[T | Exception]) -> list[T]:
    """The slots that have not failed, in order: what runs."""
    return [slot for slot in slots if not isinstance(slot, Exception)]


def in_place(slots: list[T | Exception], answers: Iterable[R]) -> list[R | Exception]:
    """`answers` (one per passing slot, in order) put back among the failures, each in its slot."""
    remaining = iter(answers)
    return [slot if isinstance(slot, Exception) else next(remaining) for slot in slots]
