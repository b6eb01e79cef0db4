"""Serve's HTTP proxy keeps the port it started with for the whole Ray session: one port for all tests."""

import pytest

from tests.serve.app_runner import free_port


@pytest.fixture(scope="session")
def serve_port() -> int:
    return free_port()
