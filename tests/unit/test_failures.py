"""Failures keep their slots: the passing requests run together and their answers come back in between."""

from __future__ import annotations

from sam3_serve_core.failures import in_place, passing


def test_answers_go_back_between_the_failures_in_order():
    bad, worse = ValueError("bad"), KeyError("worse")
    slots = [bad, "a", "b", worse, "c"]
    assert passing(slots) == ["a", "b", "c"]
    assert in_place(slots, ["A", "B", "C"]) == [bad, "A", "B", worse, "C"]


def test_nothing_passing_runs_nothing():
    failures = [ValueError("one"), ValueError("two")]
    assert passing(failures) == []
    assert in_place(failures, []) == failures
    assert in_place([], []) == []
