"""The deployments' options live in serve_config.yaml alone: the decorators set none, and the file sets every
deployment's resources and replica limits."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOYMENTS = ["Sam3Ingress", "Sam3Preprocessor", "Sam3ModelPool", "Sam3Postprocessor"]


def decorators_of(class_name: str) -> list[ast.expr]:
    for path in (REPO / "deployments").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name == class_name:
                return node.decorator_list
    raise AssertionError(f"no class {class_name} in deployments/")


def test_the_decorators_set_no_deployment_options():
    for name in DEPLOYMENTS:
        deployment = [d for d in decorators_of(name) if "serve.deployment" in ast.unparse(d)]
        assert [ast.unparse(d) for d in deployment] == ["serve.deployment"], name


def test_serve_config_sets_every_deployments_resources_and_limits():
    (application,) = yaml.safe_load((REPO / "serve_config.yaml").read_text())["applications"]
    configured = {deployment["name"]: deployment for deployment in application["deployments"]}
    assert sorted(configured) == sorted(DEPLOYMENTS)
    for name, deployment in configured.items():
        assert "num_cpus" in deployment["ray_actor_options"], name
        assert "max_ongoing_requests" in deployment, name
        assert "num_replicas" in deployment or "autoscaling_config" in deployment, name
    assert configured["Sam3ModelPool"]["ray_actor_options"]["num_gpus"] == 1
