"""The KubeRay manifest and the image definition, checked without a cluster or a container daemon.

The committed deploy/kuberay/rayservice.yaml must be exactly what `python -m tools.kuberay` makes from
serve_config.yaml, so a change to the config that is not regenerated fails here. Its pod templates are
validated against Kubernetes' own schemas (kubernetes-validate, offline, strict: unknown fields fail); the
RayService's own fields, for which no offline schema exists, are checked one by one. deploy/Dockerfile is
linted with hadolint and checked against the pins and the packages the application imports.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from client.protocol import READY_PATH
from tools.kuberay import (
    API_KEY_FILE,
    API_KEYS_PATH,
    CONSTRAINTS,
    MODELS_PATH,
    KubeRayOptions,
    cpu_group_max,
    main,
    manifest_text,
    pinned_versions,
    ray_base_image,
    replica_bounds,
)
from tools.profiles import MODEL_POOL

REPO = Path(__file__).resolve().parents[2]
SERVE_CONFIG = REPO / "serve_config.yaml"
MANIFEST = REPO / "deploy" / "kuberay" / "rayservice.yaml"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
KUBERNETES_VERSION = "1.34.0"
PINS = pinned_versions(CONSTRAINTS.read_text())


@pytest.fixture(scope="module")
def service() -> dict:
    return yaml.safe_load(MANIFEST.read_text())


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(SERVE_CONFIG.read_text())


def pod_templates(service: dict) -> dict[str, dict]:
    cluster = service["spec"]["rayClusterConfig"]
    groups = {group["groupName"]: group["template"] for group in cluster["workerGroupSpecs"]}
    return {"head": cluster["headGroupSpec"]["template"], **groups}


def containers(service: dict) -> list[dict]:
    return [container for template in pod_templates(service).values() for container in template["spec"]["containers"]]


def test_the_committed_manifest_is_what_the_command_makes_from_serve_config(tmp_path):
    output = tmp_path / "rayservice.yaml"
    main([str(SERVE_CONFIG), "-o", str(output)])
    regenerate = "python -m tools.kuberay serve_config.yaml -o deploy/kuberay/rayservice.yaml"
    assert output.read_text() == MANIFEST.read_text(), f"the committed manifest is stale: {regenerate}"


def with_mounted_api_keys(config: dict) -> dict:
    """`config` reading the API keys from the mounted Secret's file, which rotates, not the environment."""
    (application,) = config["applications"]
    args = {**application["args"], "api_key_env": None, "api_key_file": API_KEY_FILE}
    return {**config, "applications": [{**application, "args": args}]}


def test_serve_config_v2_is_serve_config_with_the_api_keys_from_the_mounted_secret(service, config):
    assert isinstance(service["spec"]["serveConfigV2"], str), "KubeRay takes serveConfigV2 as a YAML string"
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == with_mounted_api_keys(config)


def test_a_checkpoint_on_the_volume_replaces_the_hub_name_and_nothing_else(config):
    options = KubeRayOptions(checkpoint=f"{MODELS_PATH}/sam3")
    served = yaml.safe_load(
        yaml.safe_load(manifest_text(config, options, CONSTRAINTS.read_text()))["spec"]["serveConfigV2"]
    )
    assert served["applications"][0]["args"]["models"] == {"sam3": f"{MODELS_PATH}/sam3"}
    served["applications"][0]["args"]["models"] = config["applications"][0]["args"]["models"]
    assert served == with_mounted_api_keys(config)


def test_the_rayservice_has_the_fields_kuberay_needs(service):
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", service["metadata"]["name"]), "a DNS-1035 label"
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == PINS["ray"]
    assert cluster["enableInTreeAutoscaling"] is True, "Serve's autoscaling needs the Ray autoscaler to add pods"
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"] == {"num-gpus": "0", "dashboard-host": "0.0.0.0"}
    assert {port["name"]: port["containerPort"] for port in head["template"]["spec"]["containers"][0]["ports"]} == {
        "gcs-server": 6379, "dashboard": 8265, "client": 10001, "serve": 8000
    }  # fmt: skip
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] and 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for params in [head["rayStartParams"], *(group["rayStartParams"] for group in cluster["workerGroupSpecs"])]:
        assert all(isinstance(value, str) for value in params.values()), "KubeRay takes rayStartParams as strings"


@pytest.mark.parametrize("group", ["head", "gpu", "cpu"])
def test_every_pod_template_is_a_valid_kubernetes_pod_template(service, group):
    template = pod_templates(service)[group]
    resource = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": group}, "template": template}
    kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)


def test_only_the_gpu_group_has_gpus_and_it_holds_the_model_pool_at_its_fewest_and_most_replicas(service, config):
    (pool,) = [d for d in config["applications"][0]["deployments"] if d["name"] == MODEL_POOL]
    asks = pool["ray_actor_options"]
    fewest, most = replica_bounds(pool)
    templates = pod_templates(service)
    limits = {name: template["spec"]["containers"][0]["resources"]["limits"] for name, template in templates.items()}
    assert "nvidia.com/gpu" not in limits["head"] and "nvidia.com/gpu" not in limits["cpu"]
    gpus_per_pod = int(limits["gpu"]["nvidia.com/gpu"])
    replicas_per_pod = gpus_per_pod // asks["num_gpus"]
    assert replicas_per_pod >= 1 and int(limits["gpu"]["cpu"]) >= replicas_per_pod * asks["num_cpus"]
    (gpu_group,) = [g for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"] if g["groupName"] == "gpu"]
    assert gpu_group["minReplicas"] * replicas_per_pod >= fewest
    assert gpu_group["maxReplicas"] * replicas_per_pod >= most
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in templates["gpu"]["spec"][
        "tolerations"
    ]


def test_worker_pods_are_ready_once_the_application_is_and_the_head_keeps_kuberay_s_probes(service):
    """KubeRay submits the Serve configuration once the head pod is ready: a head probe on the app would deadlock."""
    templates = pod_templates(service)
    assert "readinessProbe" not in templates["head"]["spec"]["containers"][0]
    for group in ("gpu", "cpu"):
        (command,) = [templates[group]["spec"]["containers"][0]["readinessProbe"]["exec"]["command"]]
        assert command[:2] == ["bash", "-c"] and "api/local_raylet_healthz" in command[2]
        assert command[2].endswith(f"http://localhost:8000{READY_PATH}"), command


def test_the_cpu_group_holds_the_cpu_stages_at_their_most_replicas():
    config = {"applications": [{"deployments": [
        {"name": "A", "num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}},
        {"name": "B", "autoscaling_config": {"max_replicas": 8}, "ray_actor_options": {"num_cpus": 1}},
        {"name": "C", "autoscaling_config": {"max_replicas": 4}, "ray_actor_options": {"num_cpus": 2, "num_gpus": 1}},
    ]}]}  # fmt: skip
    assert cpu_group_max(config, cpus_per_pod=4) == 3  # 8.5 CPUs; the GPU deployment has pods of its own


def test_every_pod_runs_our_image_with_the_api_keys_and_the_checkpoint_volume(service):
    expected_image = f"sam3-serve:{tomllib.loads((REPO / 'pyproject.toml').read_text())['project']['version']}"
    for container in containers(service):
        assert container["image"] == expected_image
        env = {item["name"]: item for item in container["env"]}
        assert "SAM3_API_KEY" not in env, "an environment variable never changes: the keys could not rotate"
        assert env["HF_HOME"]["value"].startswith(MODELS_PATH + "/")
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {
            "name": "sam3-secrets",
            "key": "hf-token",
            "optional": True,
        }
        assert {"name": "models", "mountPath": MODELS_PATH} in container["volumeMounts"]
        mounts = {mount["name"]: mount for mount in container["volumeMounts"]}
        assert mounts["api-keys"] == {"name": "api-keys", "mountPath": API_KEYS_PATH, "readOnly": True}
        assert "subPath" not in mounts["api-keys"], "Kubernetes never updates a Secret mounted with subPath"
    for template in pod_templates(service).values():
        volumes = {volume["name"]: volume for volume in template["spec"]["volumes"]}
        assert volumes["models"]["persistentVolumeClaim"]["claimName"] == "sam3-models"
        assert volumes["api-keys"]["secret"] == {
            "secretName": "sam3-secrets",
            "items": [{"key": "api-keys", "path": "api-keys"}],
        }, "the keys from the Secret, never from the manifest"
    served_args = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert served_args["api_key_file"] == f"{API_KEYS_PATH}/api-keys", "the args name the Secret's key in the mount"


def test_the_dockerfile_starts_from_the_official_ray_image_of_our_pins():
    dockerfile = DOCKERFILE.read_text()
    (base,) = re.findall(r"^FROM\s+(\S+)", dockerfile, flags=re.MULTILINE)
    assert base == ray_base_image(PINS) == f"rayproject/ray:{PINS['ray']}-py311-cu130"
    assert re.search(
        r'^RUN pip install --no-cache-dir -c \.ci/constraints\.txt "\.\[server\]"$', dockerfile, re.MULTILINE
    )


def copied_paths(dockerfile: str) -> set[str]:
    """The sources of every COPY (the last word of a COPY line is its destination)."""
    copied = set()
    for line in dockerfile.splitlines():
        words = [word for word in line.split() if not word.startswith("--")]
        if words[:1] == ["COPY"]:
            copied.update(word.rstrip("/") for word in words[1:-1])
    return copied


def first_party_packages(module: Path, seen: set[Path] | None = None) -> set[str]:
    """Top-level packages of this repository that `module` imports, following the imports within them."""
    seen = set() if seen is None else seen
    if module in seen:
        return set()
    seen.add(module)
    packages: set[str] = set()
    for node in ast.walk(ast.parse(module.read_text())):
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            path = REPO / name.replace(".", "/")
            for source in (path.with_suffix(".py"), path / "__init__.py"):
                if source.is_file():
                    packages.add(name.split(".")[0])
                    packages |= first_party_packages(source, seen)
    return packages


def test_the_dockerfile_copies_every_package_the_application_imports_and_what_pip_needs():
    copied = copied_paths(DOCKERFILE.read_text())
    imported = first_party_packages(REPO / "deployments" / "app.py")
    assert {"deployments", "client"} <= imported
    assert imported <= copied
    packaged = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {pattern.rstrip("*") for pattern in packaged} <= copied
    assert {"pyproject.toml", "README.md", ".ci/constraints.txt"} <= copied


def test_the_dockerfile_passes_hadolint():
    linted = subprocess.run(
        [Path(sys.executable).with_name("hadolint"), str(DOCKERFILE)], capture_output=True, text=True
    )
    assert linted.returncode == 0, linted.stdout + linted.stderr
