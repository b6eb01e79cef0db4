"""The README's test command (`bash tests/run.sh`: pytest with no paths, so `testpaths`) runs every layer.

A folder of tests missing from `testpaths` never runs and nobody notices (tests/cluster was lost that way
when two branches merged), and the order of the layers matters: see the comment on `testpaths`.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"


def configured_testpaths() -> list[str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["testpaths"]


def folders_with_tests() -> set[str]:
    return {path.parent.relative_to(REPO).as_posix() for path in TESTS.rglob("test_*.py")}


def uses(folder: str, text: str) -> bool:
    """Whether a test module or conftest of `folder` (this file aside) has `text`."""
    files = [path for path in (REPO / folder).rglob("*.py") if path != Path(__file__).resolve()]
    return any(text in path.read_text() for path in files)


def test_every_folder_of_tests_is_in_testpaths():
    paths = configured_testpaths()
    collected = {folder for folder in folders_with_tests() if any(f"{folder}/".startswith(f"{p}/") for p in paths)}
    assert collected == folders_with_tests(), f"never run by `bash tests/run.sh`: {folders_with_tests() - collected}"
    assert all((REPO / path).is_dir() for path in paths), paths


def test_the_layers_that_start_their_own_cluster_run_before_the_in_process_ray_and_the_browser_last():
    """`ray start` clusters (tests/jobs, tests/cluster) run before the session's in-process Ray instance is
    started by the first test that asks for `ray_address`, which lives until the session ends."""
    paths = configured_testpaths()
    own_cluster = [index for index, path in enumerate(paths) if uses(path, "from tests.ray_cluster import Cluster")]
    in_process = [index for index, path in enumerate(paths) if uses(path, "ray_address")]
    assert {paths[index] for index in own_cluster} >= {"tests/jobs", "tests/cluster"}
    assert in_process and max(own_cluster) < min(in_process), paths
    assert paths[-1] == "tests/browser", paths
