"""A KubeRay `RayService` generated from serve_config.yaml, so that the manifest and the config never drift apart.

    python -m tools.kuberay serve_config.yaml -o deploy/kuberay/rayservice.yaml [--image IMAGE] [--checkpoint DIR]

`spec.serveConfigV2` is serve_config.yaml's configuration (the GPU profile) as a YAML string: what `serve
deploy` takes. The Ray cluster around it is sized from what the deployments ask for:
- a head node with no GPU (`num-gpus: "0"`): the Serve controller, an HTTP proxy and CPU replicas;
- a GPU worker group of `gpus_per_pod` GPUs a pod, from the model pool's `min_replicas` to its
  `max_replicas` times the GPUs one replica asks for;
- a CPU worker group that starts empty, for the preprocessor and postprocessor when they scale out.
Ray's autoscaler (`enableInTreeAutoscaling`) adds and removes worker pods as Serve's autoscaling asks.

Every pod runs our image (deploy/Dockerfile: the official Ray image of the version we pin, with our
package), mounts the Secret's API keys as the file that `api_key_file` names (a mounted Secret is updated
in place when it changes, so keys rotate without a restart; an environment variable never changes), and
mounts the checkpoint volume (a PersistentVolumeClaim, with the Hugging Face cache on it and `HF_TOKEN` from
the Secret for a hub name): any pod may run the ingress, and the preprocessor reads the checkpoint's tokenizer.

Worker pods are ready only once the application is (`/v1/ready`: every stage has a running replica), so
KubeRay's serve Service sends them no traffic before then. The head pod keeps KubeRay's own probes: KubeRay
submits the Serve configuration only once the head pod is ready, so a head probe on the application would
never pass. While the application starts, the head's proxy answers 503 with the reason and Retry-After.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from importlib.metadata import version
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

from client.protocol import READY_PATH
from deployments.config import set_default_checkpoint
from tools.profiles import MODEL_POOL

REPO = Path(__file__).resolve().parents[1]
CONSTRAINTS = REPO / ".ci" / "constraints.txt"
MODELS_PATH = "/models"
API_KEYS_PATH = "/etc/sam3/api-keys"  # the Secret's directory: its key `api-keys` is the file below
API_KEY_FILE = f"{API_KEYS_PATH}/api-keys"
SERVE_PORT = 8000
# KubeRay's default worker probe checks the raylet and the proxy; ours checks the raylet and the application.
RAYLET_HEALTH = "wget -T 2 -q -O- http://localhost:52365/api/local_raylet_healthz | grep success"
WORKER_READINESS_PROBE = {
    "exec": {"command": ["bash", "-c", f"{RAYLET_HEALTH} && wget -T 2 -q -O /dev/null http://localhost:{SERVE_PORT}{READY_PATH}"]},
    "initialDelaySeconds": 10,
    "periodSeconds": 5,
    "timeoutSeconds": 5,
    "failureThreshold": 1,
}
# The Python of the official Ray image we build on: the one the pinned versions are tested with in CI.
IMAGE_PYTHON = "3.11"
HEADER = """\
# Generated from serve_config.yaml by `python -m tools.kuberay`; do not edit by hand (see README.md,
# "Deploying on Kubernetes (KubeRay)"). tests/unit/test_kuberay.py checks that the two agree.
"""


class KubeRayOptions(BaseModel):
    """What the manifest needs beyond serve_config.yaml: names, the image, and the size of each pod."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("sam3", description="The RayService's name; KubeRay's services are named after it.")
    image: str = Field(
        default_factory=lambda: f"sam3-serve:{version('sam3-serve')}",
        description="The image deploy/Dockerfile builds, as pushed to a registry the cluster pulls from.",
    )
    checkpoint: str | None = Field(None, description="The default model's checkpoint instead of the configured one, e.g. a directory on the volume.")
    models_claim: str = Field("sam3-models", description="The PersistentVolumeClaim mounted at /models.")
    secret: str = Field(
        "sam3-secrets", description="The Secret holding `api-keys` (one a line) and, optionally, `hf-token`."
    )
    gpus_per_pod: int = Field(1, ge=1)
    gpu_pod_cpus: int = Field(8, ge=1)
    gpu_pod_memory: str = "48Gi"
    head_cpus: int = Field(4, ge=1)
    head_memory: str = "16Gi"
    cpu_pod_cpus: int = Field(4, ge=1)
    cpu_pod_memory: str = "16Gi"


def pinned_versions(constraints: str) -> dict[str, str]:
    """`name==version` lines of a pip constraints file, by lower-cased name."""
    pins = (line.split("#")[0].strip() for line in constraints.splitlines())
    return {
        name.strip().lower(): pin.strip() for name, _, pin in (line.partition("==") for line in pins if "==" in line)
    }


def ray_base_image(pins: dict[str, str], python: str = IMAGE_PYTHON) -> str:
    """The official Ray image our Dockerfile must start from: the pinned Ray, and the CUDA the pinned torch uses."""
    cuda_major, cuda_minor = pins["cuda-toolkit"].split(".")[:2]
    return f"rayproject/ray:{pins['ray']}-py{python.replace('.', '')}-cu{cuda_major}{cuda_minor}"


def deployment_options(config: dict, name: str) -> dict:
    """One deployment's overrides in the config's first application."""
    (found,) = [d for d in config["applications"][0]["deployments"] if d["name"] == name]
    return found


def replica_bounds(deployment: dict) -> tuple[int, int]:
    """(fewest, most) replicas a deployment runs: its autoscaling bounds, or its fixed count."""
    autoscaling = deployment.get("autoscaling_config")
    if autoscaling:
        return autoscaling.get("min_replicas", 1), autoscaling["max_replicas"]
    count = deployment.get("num_replicas", 1)
    return count, count


def gpu_group_bounds(config: dict, gpus_per_pod: int) -> tuple[int, int]:
    """GPU pods for the model pool at its fewest and its most replicas."""
    pool = deployment_options(config, MODEL_POOL)
    gpus = pool["ray_actor_options"]["num_gpus"]
    fewest, most = replica_bounds(pool)
    return math.ceil(fewest * gpus / gpus_per_pod), math.ceil(most * gpus / gpus_per_pod)


def cpu_group_max(config: dict, cpus_per_pod: int) -> int:
    """CPU pods that hold every deployment without GPUs at its most replicas (the head and GPU pods help too)."""
    cpus = sum(
        replica_bounds(d)[1] * d.get("ray_actor_options", {}).get("num_cpus", 1)
        for d in config["applications"][0]["deployments"]
        if not d.get("ray_actor_options", {}).get("num_gpus")
    )
    return math.ceil(cpus / cpus_per_pod)


def _container(name: str, options: KubeRayOptions, resources: dict[str, str]) -> dict:
    hf_token = {"name": options.secret, "key": "hf-token", "optional": True}
    env = [
        {"name": "HF_HOME", "value": f"{MODELS_PATH}/huggingface"},
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": hf_token}},
    ]
    return {
        "name": name,
        "image": options.image,
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "env": env,
        "ports": [{"name": "serve", "containerPort": SERVE_PORT}],
        "volumeMounts": [
            {"name": "models", "mountPath": MODELS_PATH},
            {"name": "dshm", "mountPath": "/dev/shm"},
            # A whole directory: Kubernetes never updates a Secret mounted with subPath.
            {"name": "api-keys", "mountPath": API_KEYS_PATH, "readOnly": True},
        ],
        # Ray drains the node (its replicas are moved first) before Kubernetes stops the pod.
        "lifecycle": {"preStop": {"exec": {"command": ["/bin/sh", "-c", "ray stop"]}}},
    }


def _worker_container(options: KubeRayOptions, resources: dict[str, str]) -> dict:
    """A worker's container, ready for traffic only once the application is."""
    return {**_container("ray-worker", options, resources), "readinessProbe": copy.deepcopy(WORKER_READINESS_PROBE)}


def _pod(container: dict, options: KubeRayOptions, gpu: bool = False) -> dict:
    spec: dict = {
        "containers": [container],
        "volumes": [
            {"name": "models", "persistentVolumeClaim": {"claimName": options.models_claim}},
            # Ray's object store lives in /dev/shm, which a container otherwise gets only 64 MB of.
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
            {
                "name": "api-keys",
                "secret": {"secretName": options.secret, "items": [{"key": "api-keys", "path": "api-keys"}]},
            },
        ],
    }
    if gpu:
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"spec": spec}


def rayservice(config: dict, options: KubeRayOptions, ray_version: str) -> dict:
    """The RayService for `config` (serve_config.yaml's content): serveConfigV2 plus the cluster that runs it."""
    config = copy.deepcopy(config)
    for application in config["applications"]:
        if options.checkpoint is not None:
            set_default_checkpoint(application["args"], options.checkpoint)
        # The keys come from the mounted Secret, which rotates; the environment would not.
        application["args"].update(api_key_env=None, api_key_file=API_KEY_FILE)
    gpu_min, gpu_max = gpu_group_bounds(config, options.gpus_per_pod)
    head = _container("ray-head", options, {"cpu": str(options.head_cpus), "memory": options.head_memory})
    head["ports"] = [
        {"name": "gcs-server", "containerPort": 6379},
        {"name": "dashboard", "containerPort": 8265},
        {"name": "client", "containerPort": 10001},
        {"name": "serve", "containerPort": SERVE_PORT},
    ]
    gpu_resources = {"cpu": str(options.gpu_pod_cpus), "memory": options.gpu_pod_memory,
                     "nvidia.com/gpu": str(options.gpus_per_pod)}  # fmt: skip
    cpu_resources = {"cpu": str(options.cpu_pod_cpus), "memory": options.cpu_pod_memory}
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": options.name, "labels": {"app.kubernetes.io/name": "sam3-serve"}},
        "spec": {
            "serveConfigV2": yaml.safe_dump(config, sort_keys=False),
            "rayClusterConfig": {
                "rayVersion": ray_version,
                "enableInTreeAutoscaling": True,
                "headGroupSpec": {
                    "rayStartParams": {"num-gpus": "0", "dashboard-host": "0.0.0.0"},
                    "template": _pod(head, options),
                },
                "workerGroupSpecs": [
                    {
                        "groupName": "gpu",
                        "replicas": gpu_min,
                        "minReplicas": gpu_min,
                        "maxReplicas": gpu_max,
                        "rayStartParams": {},
                        "template": _pod(_worker_container(options, gpu_resources), options, gpu=True),
                    },
                    {
                        "groupName": "cpu",
                        "replicas": 0,
                        "minReplicas": 0,
                        "maxReplicas": cpu_group_max(config, options.cpu_pod_cpus),
                        "rayStartParams": {},
                        "template": _pod(_worker_container(options, cpu_resources), options),
                    },
                ],
            },
        },
    }


class _LiteralDumper(yaml.SafeDumper):
    """Multi-line strings as `|` blocks, so serveConfigV2 reads as the YAML it is."""


_LiteralDumper.add_representer(
    str,
    lambda dumper, text: dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None),
)


def manifest_text(config: dict, options: KubeRayOptions, constraints: str) -> str:
    """The manifest file's text: the header, then the RayService for the pinned Ray version."""
    service = rayservice(config, options, pinned_versions(constraints)["ray"])
    return HEADER + yaml.dump(service, Dumper=_LiteralDumper, sort_keys=False, width=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path, help="the source serve_config.yaml")
    parser.add_argument("-o", "--output", type=Path, help="where to write the manifest (default: stdout)")
    parser.add_argument("--name", help="the RayService's name (default: sam3)")
    parser.add_argument("--image", help="the image deploy/Dockerfile built, as pushed (default: sam3-serve:VERSION)")
    parser.add_argument("--checkpoint", help="the default model's checkpoint instead of the configured one, e.g. /models/sam3 on the volume")
    args = parser.parse_args(argv)
    given = {key: value for key in ("name", "image", "checkpoint") if (value := getattr(args, key)) is not None}
    text = manifest_text(yaml.safe_load(args.config.read_text()), KubeRayOptions(**given), CONSTRAINTS.read_text())
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
