"""API keys that rotate: a file of keys, one a line, re-read as it changes, so a key is replaced with no restart.

An operator adds the new key as a line, moves callers to it, then removes the old line; every request in
between is accepted with either key. A removed key is refused by every request that reaches the ingress
more than `api_key_refresh_s` after the file changed. Kubernetes mounts a Secret this way (a directory
whose `..data` symlink it swaps to the new contents), so the file is opened by name at every re-read.

Keys are held only as SHA-256 digests, and nothing here logs, counts or reports a key or its digest.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

from deployments.config import AppArgs

logger = logging.getLogger("ray.serve")


def parse_keys(text: str) -> list[str]:
    """One key a line; blank lines, whitespace around a key and `#` comment lines are ignored."""
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def key_digests(keys: Iterable[str]) -> frozenset[bytes]:
    return frozenset(hashlib.sha256(key.encode()).digest() for key in keys)


def file_digest(text: str) -> bytes:
    """What the file's contents are compared by, so that no copy of them is kept."""
    return hashlib.sha256(text.encode()).digest()


def matches_any(token: str, digests: frozenset[bytes]) -> bool:
    """Whether `token` is one of the keys, in time that says nothing about which key or how much of one.

    The token's digest is compared with every key's, with no early exit, and digests are all one length,
    so neither a match's position nor a key's length shows in the response time.
    """
    presented = hashlib.sha256(token.encode()).digest()
    found = False
    for digest in digests:
        found |= hmac.compare_digest(presented, digest)
    return found


class KeySet(Protocol):
    def accepts(self, token: str) -> bool: ...


class FixedKeys:
    """One key from the environment, which a running process never sees change: rotating it needs a restart."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = key_digests(keys)

    def accepts(self, token: str) -> bool:
        return matches_any(token, self._digests)


class KeyFile:
    """The keys in a file, re-read at most every `refresh_s` seconds, on the request that finds it due.

    Reading a few hundred bytes every few seconds costs microseconds, so the contents themselves are
    compared rather than the file's stat, which an in-place rewrite of the same size can leave unchanged.

    At start, a file that cannot be read or holds no key fails the replica: a service meant to need a key
    must not start open. Later, such a file keeps the last keys, with a warning: a file read while it is
    being rewritten (truncated, half written, or gone for a moment) must not refuse every caller. To refuse
    every caller, replace the keys with one that nobody holds.
    """

    def __init__(self, path: str | os.PathLike, refresh_s: float, clock: Callable[[], float] = time.monotonic):
        self.path = Path(path)
        self.refresh_s = refresh_s
        self.clock = clock
        text = self.path.read_text()
        keys = parse_keys(text)
        if not keys:
            raise ValueError(f"the API key file {self.path} holds no key: write one key a line, or unset api_key_file")
        self._digests, self._file_digest = key_digests(keys), file_digest(text)
        self._read_at = clock()
        self._failing = False
        logger.info("API keys: %d read from %s, re-read every %s s", len(keys), self.path, refresh_s)

    def accepts(self, token: str) -> bool:
        if self.clock() - self._read_at >= self.refresh_s:
            self.refresh()
        return matches_any(token, self._digests)

    def refresh(self) -> None:
        """Re-read the file; the keys change only when it holds at least one."""
        self._read_at = self.clock()
        try:
            text = self.path.read_text()
        except OSError as error:
            self._warn(f"cannot be read ({error.strerror})")
            return
        if file_digest(text) == self._file_digest:
            self._failing = False
            return
        keys = parse_keys(text)
        if not keys:
            self._warn("holds no key")
            return
        self._digests, self._file_digest, self._failing = key_digests(keys), file_digest(text), False
        logger.info("API keys: %d read from %s", len(keys), self.path)

    def _warn(self, problem: str) -> None:
        """Once per spell of failure, not at every re-read."""
        if not self._failing:
            count = len(self._digests)
            logger.warning("API key file %s %s; the keys last read (%d) stay in use", self.path, problem, count)
        self._failing = True


def load_api_keys(args: AppArgs, clock: Callable[[], float] = time.monotonic) -> KeySet | None:
    """The keys from a mounted file or the environment, never from serve_config.yaml; None turns auth off."""
    if args.api_key_file:
        return KeyFile(args.api_key_file, args.api_key_refresh_s, clock)
    key = os.environ.get(args.api_key_env, "").strip() if args.api_key_env else ""
    return FixedKeys([key]) if key else None


def is_authorized(authorization: str | None, keys: KeySet | None) -> bool:
    """A bearer token that is one of the keys; anything goes when the service has none."""
    if keys is None:
        return True
    scheme, _, token = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and keys.accepts(token.strip())
