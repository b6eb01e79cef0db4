"""The client part installs and imports in a fresh virtual environment without torch, Ray or transformers."""

from __future__ import annotations

import subprocess
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_client_installs_without_heavy_dependencies(tmp_path):
    env_dir = tmp_path / "client-venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "-c", REPO / ".ci" / "constraints.txt", REPO],
        check=True,
        capture_output=True,
    )
    installed = subprocess.run([python, "-m", "pip", "list", "--format=freeze"], check=True, capture_output=True, text=True)
    names = {line.split("==")[0].lower() for line in installed.stdout.splitlines()}
    assert {"numpy", "pillow", "pycocotools", "pydantic", "httpx"} <= names
    assert not names & {"torch", "ray", "transformers", "torchvision"}
    probe = (
        "import sys, client, client.errors; "
        "assert not {'torch', 'ray', 'transformers'} & set(sys.modules), sorted(sys.modules); "
        "print(client.errors.InvalidImageError('x').code)"
    )
    result = subprocess.run([python, "-c", probe], check=True, capture_output=True, text=True, cwd=tmp_path)
    assert result.stdout.strip() == "invalid_image"
