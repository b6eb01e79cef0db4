"""The real application, one per test module, and both clients on it (the browser tests use them too).

Serve's HTTP proxy keeps the port it started with for the whole Ray session, so `serve_port` is one
session fixture in tests/conftest.py, shared by every layer that starts the application.
"""

import pytest
from ray import serve

from client import Sam3HandleClient, Sam3HttpClient
from tests.serve.app_runner import APP_NAME, cpu_config, serve_run


@pytest.fixture(scope="module")
def app_url(ray_address, serve_port, tiny112_dir, tmp_path_factory):
    """The application from serve_config.yaml's CPU profile on the tiny checkpoint, one per test module."""
    config = cpu_config(str(tiny112_dir), serve_port)
    yield serve_run(config, tmp_path_factory.mktemp("serve") / "config.yaml", ray_address)
    serve.delete(APP_NAME)


@pytest.fixture(scope="module")
def http_client(app_url):
    with Sam3HttpClient(app_url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def handle_client(app_url):
    return Sam3HandleClient(APP_NAME)
