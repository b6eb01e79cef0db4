"""The bounds on a replica's video sessions: count, bytes, idle time; least recently used evicted; typed errors."""

from __future__ import annotations

import pytest

from client.errors import SessionNotFoundError, VideoTooLongError
from sam3_serve_core.video_sessions import CLOSED, EVICTED, GONE_REMEMBERED, IDLE, SessionLimits, VideoSessions


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def sessions(max_sessions: int = 3, max_bytes: int = 1000, idle_timeout_s: float = 60) -> tuple[VideoSessions, Clock]:
    clock = Clock()
    return VideoSessions(SessionLimits(max_sessions, max_bytes, idle_timeout_s), clock=clock), clock


def test_a_session_is_held_under_its_own_id_until_it_is_ended():
    store, _ = sessions()
    first, second = store.open("a", 100), store.open("b", 200)
    assert first != second and len(first) == 32
    assert (store.get(first), store.get(second), store.held_bytes) == ("a", "b", 300)
    store.close(first)
    store.close(first)  # closing twice is not an error
    with pytest.raises(SessionNotFoundError, match="it was ended; start a new session") as gone:
        store.get(first)
    assert gone.value.code == "session_not_found" and gone.value.http_status == 404
    with pytest.raises(SessionNotFoundError, match="no replica holds it"):
        store.get("0" * 32)


def test_past_the_count_the_least_recently_used_session_is_evicted():
    store, _ = sessions(max_sessions=2)
    first, second = store.open("a", 10), store.open("b", 10)
    store.get(first)  # the second is now the least recently used
    third = store.open("c", 10)
    assert store.get(first) == "a" and store.get(third) == "c" and len(store) == 2
    with pytest.raises(SessionNotFoundError, match="evicted to make room"):
        store.get(second)


def test_past_the_bytes_least_recently_used_sessions_are_evicted_until_the_new_one_fits():
    store, _ = sessions(max_sessions=10, max_bytes=1000)
    ids = [store.open(name, 300) for name in "abc"]
    big = store.open("d", 600)  # 900 + 600 > 1000: a and b go, c stays (300 + 600 fit)
    assert store.get(ids[2]) == "c" and store.get(big) == "d" and store.held_bytes == 900
    for evicted in ids[:2]:
        with pytest.raises(SessionNotFoundError, match="evicted"):
            store.get(evicted)


def test_a_growing_session_evicts_others_but_never_itself():
    store, _ = sessions(max_sessions=10, max_bytes=1000)
    other, growing = store.open("a", 400), store.open("b", 400)
    store.resize(growing, 700)
    assert store.get(growing) == "b" and store.held_bytes == 700
    with pytest.raises(SessionNotFoundError):
        store.get(other)
    store.resize(growing, 1000)  # alone at the limit: still held
    assert store.held_bytes == 1000


def test_a_session_larger_than_the_whole_budget_is_refused_and_others_stay():
    store, _ = sessions(max_bytes=1000)
    kept = store.open("a", 500)
    with pytest.raises(VideoTooLongError, match="at most 0 MB") as refused:
        store.open("b", 1001)
    assert refused.value.code == "video_too_long" and refused.value.http_status == 413
    with pytest.raises(VideoTooLongError):
        store.resize(kept, 1001)
    assert store.get(kept) == "a" and store.held_bytes == 500


def test_an_idle_session_expires_and_using_one_keeps_it():
    store, clock = sessions(idle_timeout_s=60)
    idle, used = store.open("a", 10), store.open("b", 10)
    clock.now = 50
    store.get(used)
    clock.now = 100  # idle: 100 s since use; used: 50 s
    assert store.get(used) == "b"
    with pytest.raises(SessionNotFoundError, match="idle for 60 s"):
        store.get(idle)
    assert len(store) == 1


def test_only_so_many_gone_sessions_are_remembered():
    store, _ = sessions(max_sessions=1)
    first = store.open("a", 1)
    for _ in range(GONE_REMEMBERED + 1):  # the first is evicted, then GONE_REMEMBERED others
        store.open("x", 1)
    with pytest.raises(SessionNotFoundError, match="no replica holds it"):
        store.get(first)


def test_every_end_is_heard_with_its_reason_and_a_sweep_ends_idle_sessions_unasked():
    clock, ended = Clock(), []
    store = VideoSessions(SessionLimits(2, 1000, 60), clock=clock, on_end=lambda state, reason: ended.append((state, reason)))
    closed, idle = store.open("closed", 10), store.open("idle", 20)
    store.close(closed)
    store.close(closed)  # gone already: no second end
    store.open("newer", 30)
    store.open("newest", 40)  # two held at most: "idle" is the least recently used
    assert ended == [("closed", CLOSED), ("idle", EVICTED)]
    assert sorted((state, nbytes) for _, state, nbytes in store.holdings()) == [("newer", 30), ("newest", 40)]
    clock.now = 61
    store.expire_idle()  # nothing else asked of the store
    assert ended[2:] == [("newer", IDLE), ("newest", IDLE)] and store.holdings() == []
    with pytest.raises(SessionNotFoundError, match="evicted"):
        store.get(idle)
