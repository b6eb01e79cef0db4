"""The offline demo end to end, as its own process with its own Ray (never the test session's)."""

from __future__ import annotations

import os
import subprocess
import sys

from PIL import Image
from skimage import data

from sam3_serve_core.checkpoint import is_tiny_checkpoint
from tools.launch import REPO, free_port

OVERLAYS = ("overlay_text.png", "overlay_box.png", "overlay_point.png")


def test_demo_serves_and_segments_the_sample(tmp_path, tiny112_dir):
    # --checkpoint reuses the session's tiny checkpoint and exercises the real-weights setting.
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    command = [sys.executable, "-m", "tools.demo", "--out", str(tmp_path), "--port", str(free_port())]
    result = subprocess.run(
        [*command, "--checkpoint", str(tiny112_dir)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-4000:]}"
    height, width = data.chelsea().shape[:2]
    for name in OVERLAYS:
        with Image.open(tmp_path / name) as overlay:
            assert overlay.mode == "RGB"
            assert overlay.size == (width, height)
    if is_tiny_checkpoint(str(tiny112_dir)):
        assert "meaningless" in result.stdout
    assert "shut down Serve and Ray" in result.stdout
