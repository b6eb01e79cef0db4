"""The video sessions a model replica holds, bounded in count, in bytes and in idle time.

A video session's state (transformers' inference session: its frames, the tracker's memories, each object's
outputs) lives on the replica that made it, on its device, and grows as frames are added. The replica holds
at most `max_sessions` of them and `max_bytes` in all: a new or growing session evicts the least recently used
others to fit, and a session left idle for `idle_timeout_s` is dropped (when the store is next used, or swept:
`expire_idle`). A session asked for once gone raises `SessionNotFoundError`, which says why (ended, idle,
evicted for room, or never held here), so that the caller knows to start again; `on_end` hears of every end,
with its reason. Ray-free; one lock, for the replica's event loop and its model threads.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from client.errors import SessionNotFoundError, VideoTooLongError

State = TypeVar("State")
# How many ended sessions are remembered, to say why one is gone.
GONE_REMEMBERED = 1024
# Why a session ended, as `on_end` hears it: a bounded set, fit for a metric's tag.
CLOSED, IDLE, EVICTED = "closed", "idle", "evicted"


@dataclass(frozen=True)
class SessionLimits:
    max_sessions: int
    max_bytes: int
    idle_timeout_s: float


@dataclass
class _Held(Generic[State]):
    state: State
    nbytes: int
    last_used: float


class VideoSessions(Generic[State]):
    def __init__(
        self,
        limits: SessionLimits,
        clock: Callable[[], float] = time.monotonic,
        on_end: Callable[[State, str], None] | None = None,
    ):
        self.limits = limits
        self._clock = clock
        self._on_end = on_end
        self._held: OrderedDict[str, _Held[State]] = OrderedDict()  # least recently used first
        self._gone: OrderedDict[str, str] = OrderedDict()  # session id -> why it is gone
        self._lock = threading.Lock()

    @property
    def held_bytes(self) -> int:
        return sum(held.nbytes for held in self._held.values())

    def __len__(self) -> int:
        return len(self._held)

    def holdings(self) -> list[tuple[str, State, int]]:
        """Each session held: its id, its state and its bytes."""
        with self._lock:
            return [(session_id, held.state, held.nbytes) for session_id, held in self._held.items()]

    def expire_idle(self) -> None:
        """End the sessions idle for `idle_timeout_s`, without waiting for the store's next use."""
        with self._lock:
            self._expire_idle()

    def open(self, state: State, nbytes: int) -> str:
        """Hold a new session and return its id, evicting the least recently used others to fit."""
        self._check_fits(nbytes)
        session_id = secrets.token_hex(16)
        with self._lock:
            self._expire_idle()
            self._make_room(nbytes, sessions=1)
            self._held[session_id] = _Held(state, nbytes, self._clock())
        return session_id

    def get(self, session_id: str) -> State:
        """The session's state, now its most recently used."""
        with self._lock:
            self._expire_idle()
            held = self._held_or_raise(session_id)
            held.last_used = self._clock()
            self._held.move_to_end(session_id)
            return held.state

    def resize(self, session_id: str, nbytes: int) -> None:
        """The session grew (or shrank) to `nbytes`: others are evicted, least recently used first, to fit."""
        self._check_fits(nbytes)
        with self._lock:
            held = self._held_or_raise(session_id)
            self._held.move_to_end(session_id)
            held.nbytes, held.last_used = nbytes, self._clock()
            self._make_room(0, sessions=0)

    def close(self, session_id: str, why: str = "it was ended", reason: str = CLOSED) -> None:
        """End the session, remembering `why`; closing one already gone is not an error."""
        with self._lock:
            held = self._held.pop(session_id, None)
            if held is not None:
                self._ended(session_id, held, why, reason)

    def _check_fits(self, nbytes: int) -> None:
        if nbytes > self.limits.max_bytes:
            raise VideoTooLongError(
                f"the session would take {nbytes / 1e6:.0f} MB; a replica holds at most "
                f"{self.limits.max_bytes / 1e6:.0f} MB of video sessions: send fewer or smaller frames"
            )

    def _held_or_raise(self, session_id: str) -> _Held[State]:
        held = self._held.get(session_id)
        if held is None:
            why = self._gone.get(session_id, "no replica holds it (its replica may have been lost)")
            raise SessionNotFoundError(f"video session {session_id} is gone: {why}; start a new session")
        return held

    def _expire_idle(self) -> None:
        deadline = self._clock() - self.limits.idle_timeout_s
        for session_id in [sid for sid, held in self._held.items() if held.last_used <= deadline]:
            self._ended(session_id, self._held.pop(session_id), f"it was idle for {self.limits.idle_timeout_s:g} s", IDLE)

    def _make_room(self, nbytes: int, sessions: int) -> None:
        """Evict from the least recently used end until `sessions` more sessions and `nbytes` more bytes fit;
        the most recently used session (the one growing) is never evicted for itself."""
        while len(self._held) > (0 if sessions else 1) and (
            len(self._held) + sessions > self.limits.max_sessions or self.held_bytes + nbytes > self.limits.max_bytes
        ):
            session_id, held = self._held.popitem(last=False)
            self._ended(session_id, held, "it was evicted to make room for newer sessions", EVICTED)

    def _ended(self, session_id: str, held: _Held[State], why: str, reason: str) -> None:
        self._gone[session_id] = why
        while len(self._gone) > GONE_REMEMBERED:
            self._gone.popitem(last=False)
        if self._on_end is not None:
            self._on_end(held.state, reason)
