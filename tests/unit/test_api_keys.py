"""API keys without Ray: the key file's format, rotation on a fake clock, Kubernetes' Secret swap, keys kept
out of the log, and the constant-time compare."""

from __future__ import annotations

import logging
import os

import pytest

from deployments import api_keys
from deployments.api_keys import FixedKeys, KeyFile, is_authorized, load_api_keys, parse_keys
from deployments.config import AppArgs

REFRESH_S = 5.0
OLD, NEW = "old-key-8f14e45fceea167a", "new-key-c9f0f895fb98ab91"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def log(caplog, monkeypatch):
    """The ingress's logger, captured once whether or not Ray has stopped it propagating to the root logger."""
    logger = logging.getLogger("ray.serve")
    monkeypatch.setattr(logger, "propagate", False)
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="ray.serve")
    yield caplog
    logger.removeHandler(caplog.handler)


def bearer(key: str) -> str:
    return f"Bearer {key}"


def test_one_key_a_line_with_blank_lines_whitespace_and_comments_ignored():
    text = f"# rotated 2025-01\n\n  {OLD}  \r\n\t{NEW}\n   \n#{OLD}-retired\n"
    assert parse_keys(text) == [OLD, NEW]
    assert parse_keys("") == parse_keys("\n  \n# none\n") == []


def test_keys_from_a_file_or_the_environment(tmp_path, monkeypatch, clock):
    key_file = tmp_path / "keys"
    key_file.write_text("from-file\n")
    monkeypatch.setenv("SAM3_API_KEY", " from-env\n")
    from_file = load_api_keys(AppArgs(api_key_file=str(key_file)), clock)
    assert is_authorized(bearer("from-file"), from_file) and not is_authorized(bearer("from-env"), from_file)
    from_env = load_api_keys(AppArgs())
    assert is_authorized(bearer("from-env"), from_env) and not is_authorized(bearer("from-file"), from_env)
    monkeypatch.delenv("SAM3_API_KEY")
    assert load_api_keys(AppArgs()) is None
    assert load_api_keys(AppArgs(api_key_env=None)) is None


@pytest.mark.parametrize(
    "header, expected",
    [("Bearer s3cret", True), ("bearer s3cret", True), ("Bearer  s3cret ", True), ("Bearer s3cre", False),
     ("Bearer", False), ("Bearer ", False), ("Basic s3cret", False), ("s3cret", False), (None, False),
     ("Bearer s3cret2", False)],
)  # fmt: skip
def test_bearer_check(header, expected):
    assert is_authorized(header, FixedKeys(["s3cret"])) is expected
    assert is_authorized(header, None) is True, "no key configured: no check"


def test_rotation_add_the_new_key_move_callers_remove_the_old_one(tmp_path, clock):
    key_file = tmp_path / "keys"
    key_file.write_text(OLD + "\n")
    keys = KeyFile(key_file, REFRESH_S, clock)
    assert keys.accepts(OLD) and not keys.accepts(NEW)

    key_file.write_text(f"{OLD}\n{NEW}\n")
    clock.now += REFRESH_S - 0.01
    assert keys.accepts(OLD) and not keys.accepts(NEW), "read at most once per interval"
    clock.now += 0.01
    assert keys.accepts(NEW) and keys.accepts(OLD), "both keys during the move"

    key_file.write_text(NEW + "\n")
    clock.now += 1.0
    assert keys.accepts(OLD), "the old key lasts until the next re-read, which is at most the interval away"
    clock.now += REFRESH_S
    assert keys.accepts(NEW) and not keys.accepts(OLD)


@pytest.mark.parametrize("changed_after_s", [0.0, 0.01, 2.5, REFRESH_S - 0.01, REFRESH_S, 7.3])
def test_a_removed_key_is_refused_by_every_request_the_interval_after_the_change(tmp_path, clock, changed_after_s):
    """Requests every 0.1 s, the last re-read at any point before the change: the bound holds regardless."""
    key_file = tmp_path / "keys"
    key_file.write_text(f"{OLD}\n{NEW}\n")
    start = clock.now
    keys = KeyFile(key_file, REFRESH_S, clock)
    changed_at = None
    for step in range(200):
        clock.now = start + step * 0.1
        if changed_at is None and clock.now >= start + changed_after_s:
            key_file.write_text(NEW + "\n")
            changed_at = clock.now
        accepted = keys.accepts(OLD)
        if changed_at is None:
            assert accepted
        elif clock.now >= changed_at + REFRESH_S:
            assert not accepted, f"{clock.now - changed_at:.1f} s after the change"
        assert keys.accepts(NEW)


def kubernetes_secret_mount(directory, contents: dict[str, str], version: int) -> None:
    """What the kubelet does to a mounted Secret: the files in a new timestamped directory, then an atomic
    swap of the `..data` symlink to it; each key is a symlink `name -> ..data/name`, made once."""
    timestamped = directory / f"..2025_01_01_00_00_0{version}.{version}"
    timestamped.mkdir()
    for name, text in contents.items():
        (timestamped / name).write_text(text)
    swap = directory / "..data_tmp"
    swap.symlink_to(timestamped.name)
    previous = os.path.realpath(directory / "..data") if (directory / "..data").exists() else None
    os.replace(swap, directory / "..data")
    for name in contents:
        if not (directory / name).is_symlink():
            (directory / name).symlink_to(f"..data/{name}")
    if previous:
        for leftover in os.scandir(previous):
            os.unlink(leftover.path)
        os.rmdir(previous)


def test_a_kubernetes_secret_swap_is_seen(tmp_path, clock):
    kubernetes_secret_mount(tmp_path, {"api-keys": OLD + "\n"}, version=1)
    keys = load_api_keys(AppArgs(api_key_file=str(tmp_path / "api-keys"), api_key_refresh_s=REFRESH_S), clock)
    assert keys.accepts(OLD) and not keys.accepts(NEW)
    kubernetes_secret_mount(tmp_path, {"api-keys": f"{OLD}\n{NEW}\n"}, version=2)
    clock.now += REFRESH_S
    assert keys.accepts(OLD) and keys.accepts(NEW)
    kubernetes_secret_mount(tmp_path, {"api-keys": NEW + "\n"}, version=3)
    clock.now += REFRESH_S
    assert keys.accepts(NEW) and not keys.accepts(OLD)


def test_a_file_that_cannot_be_read_or_holds_no_key_fails_the_start(tmp_path, clock):
    with pytest.raises(FileNotFoundError):
        KeyFile(tmp_path / "missing", REFRESH_S, clock)
    (tmp_path / "empty").write_text("\n  # no key yet\n")
    with pytest.raises(ValueError, match="holds no key"):
        KeyFile(tmp_path / "empty", REFRESH_S, clock)


def test_later_a_file_that_cannot_be_read_or_holds_no_key_keeps_the_last_keys(tmp_path, clock, log):
    key_file = tmp_path / "keys"
    key_file.write_text(OLD + "\n")
    keys = KeyFile(key_file, REFRESH_S, clock)
    for broken in (lambda: key_file.unlink(), lambda: key_file.write_text(""), lambda: key_file.write_text("# \n")):
        broken()
        for _ in range(3):
            clock.now += REFRESH_S
            assert keys.accepts(OLD) and not keys.accepts("")
        key_file.write_text(OLD + "\n")
        clock.now += REFRESH_S
        assert keys.accepts(OLD)
    warnings = [record.getMessage() for record in log.records if record.levelno == logging.WARNING]
    assert warnings == [
        f"API key file {key_file} cannot be read (No such file or directory); the keys last read (1) stay in use",
        f"API key file {key_file} holds no key; the keys last read (1) stay in use",
        f"API key file {key_file} holds no key; the keys last read (1) stay in use",
    ], "one warning per spell of failure"
    key_file.write_text(NEW + "\n")
    clock.now += REFRESH_S
    assert keys.accepts(NEW) and not keys.accepts(OLD)


def test_keys_never_appear_in_the_log(tmp_path, clock, log):
    key_file = tmp_path / "keys"
    key_file.write_text(OLD + "\n")
    keys = load_api_keys(AppArgs(api_key_file=str(key_file)), clock)
    for text in (f"{OLD}\n{NEW}\n", "", NEW):
        key_file.write_text(text)
        clock.now += 10
        is_authorized("Bearer wrong-key-d3d9446802a44259", keys)
    key_file.unlink()
    clock.now += 10
    keys.accepts(NEW)
    assert "API keys: 1 read from" in log.text and "API keys: 2 read from" in log.text
    for secret in (OLD, NEW, "wrong-key-d3d9446802a44259"):
        assert secret not in log.text
        assert secret not in repr(keys.__dict__)


def test_every_key_is_compared_in_constant_time_with_no_early_exit(tmp_path, clock, monkeypatch):
    """Each check compares the token's digest with every key's digest through `hmac.compare_digest`: equal
    lengths, so neither which key matched nor how long a key is shows in the time taken."""
    key_file = tmp_path / "keys"
    key_file.write_text("\n".join(["k1", OLD, "a-much-longer-third-key-0123456789abcdef", NEW]))
    keys = KeyFile(key_file, REFRESH_S, clock)
    compared: list[tuple[bytes, bytes]] = []
    real_compare = api_keys.hmac.compare_digest

    def spy(a, b):
        compared.append((a, b))
        return real_compare(a, b)

    monkeypatch.setattr(api_keys.hmac, "compare_digest", spy)
    for token, expected in [("k1", True), (NEW, True), ("nope", False), ("", False), (OLD + "x", False)]:
        compared.clear()
        assert keys.accepts(token) is expected
        assert len(compared) == 4, "every key, matched or not"
        assert {len(a) for pair in compared for a in pair} == {32}, "SHA-256 digests, never the keys themselves"
