"""Profiles derived from serve_config.yaml: the model pool's custom resource for placement on chosen nodes."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from tools.profiles import MODEL_POOL, cpu_profile, main, with_model_resource

SERVE_CONFIG = Path(__file__).resolve().parents[2] / "serve_config.yaml"


def actor_options(config: dict) -> dict[str, dict]:
    return {d["name"]: d.get("ray_actor_options", {}) for d in config["applications"][0]["deployments"]}


def test_only_the_model_pool_asks_for_the_custom_resource_and_the_source_is_untouched():
    source = cpu_profile(yaml.safe_load(SERVE_CONFIG.read_text()))
    before = copy.deepcopy(source)
    placed = with_model_resource(source, "sam3_model")
    assert source == before
    options = actor_options(placed)
    assert options[MODEL_POOL]["resources"] == {"sam3_model": 1.0}
    assert all("resources" not in asks for name, asks in options.items() if name != MODEL_POOL)
    assert {name: asks["num_cpus"] for name, asks in options.items()} == {
        name: asks["num_cpus"] for name, asks in actor_options(source).items()
    }


def test_resources_the_model_pool_already_asks_for_are_kept():
    config = {"applications": [{"deployments": [{"name": MODEL_POOL, "ray_actor_options": {"resources": {"a": 2}}}]}]}
    assert actor_options(with_model_resource(config, "b", 0.5))[MODEL_POOL]["resources"] == {"a": 2, "b": 0.5}


@pytest.mark.parametrize("amount", [0, -1])
def test_a_model_replica_must_ask_for_some_of_the_resource(amount):
    with pytest.raises(ValueError, match="positive"):
        with_model_resource({"applications": []}, "sam3_model", amount)


def test_the_command_adds_the_model_resource_to_the_cpu_profile(tmp_path):
    output = tmp_path / "two-nodes.yaml"
    main(["cpu", str(SERVE_CONFIG), "--model-resource", "sam3_model", "-o", str(output)])
    options = actor_options(yaml.safe_load(output.read_text()))
    assert options[MODEL_POOL]["resources"] == {"sam3_model": 1.0} and "num_gpus" not in options[MODEL_POOL]
