"""Profiles derived from `serve_config.yaml`, so the GPU configuration stays the one source of truth.

    python -m tools.profiles cpu serve_config.yaml -o sam3-cpu.yaml [--checkpoint DIR] [--model-resource NAME]

`cpu` runs the same application on a machine without a GPU: the model pool asks for no GPU and runs on
CPU, and every replica asks for a fraction of a CPU so the four deployments fit on a laptop. The model
is the one compute-bound stage, so its replica runs torch on all of the machine's cores
(`args.torch_threads`): Ray would give a fractional replica one thread, half the speed on two cores.
One batch at a time: on a CPU two batches would only fight over the same cores.

`--model-resource sam3_model` makes each model-pool replica also ask for one unit of a custom resource, so
Ray places the model pool only on nodes started with `ray start --resources '{"sam3_model": N}'` (N
replicas each) and the CPU stages elsewhere, as on a cluster of CPU and GPU nodes.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import yaml

from deployments.config import set_default_checkpoint

CPU_ACTOR_CPUS = {"Sam3Ingress": 0.1, "Sam3Preprocessor": 0.2, "Sam3ModelPool": 0.5, "Sam3Postprocessor": 0.2}


def cpu_profile(config: dict, checkpoint: str | None = None) -> dict:
    """The same application, with no GPU asked for and fractional CPUs."""
    config = copy.deepcopy(config)
    for application in config["applications"]:
        application["args"]["device"] = "cpu"
        application["args"]["dtype"] = "float32"
        application["args"]["torch_threads"] = os.cpu_count() or 1
        if checkpoint is not None:
            set_default_checkpoint(application["args"], checkpoint)
        for deployment in application.get("deployments", []):
            options = deployment.setdefault("ray_actor_options", {})
            options.pop("num_gpus", None)
            options["num_cpus"] = CPU_ACTOR_CPUS.get(deployment["name"], 0.1)
            if "max_concurrent_batches" in deployment.get("user_config", {}):
                deployment["user_config"]["max_concurrent_batches"] = 1
    return config


MODEL_POOL = "Sam3ModelPool"


def with_model_resource(config: dict, resource: str, amount: float = 1.0) -> dict:
    """The same configuration, with each model-pool replica asking for `amount` of the custom `resource`."""
    if not amount > 0:
        raise ValueError(f"a model replica must ask for a positive amount of {resource!r}, not {amount}")
    config = copy.deepcopy(config)
    for application in config["applications"]:
        for deployment in application.get("deployments", []):
            if deployment["name"] == MODEL_POOL:
                options = deployment.setdefault("ray_actor_options", {})
                options["resources"] = {**options.get("resources", {}), resource: amount}
    return config


PROFILES = {"cpu": cpu_profile}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile", choices=sorted(PROFILES))
    parser.add_argument("config", type=Path, help="the source serve_config.yaml")
    parser.add_argument("-o", "--output", type=Path, help="where to write the profile (default: stdout)")
    parser.add_argument("--checkpoint", help="the default model's checkpoint instead of the configured one (a hub name or a directory)")
    parser.add_argument(
        "--model-resource",
        metavar="NAME",
        help="each model-pool replica also asks for one unit of this custom resource (only nodes offering it hold one)",
    )
    args = parser.parse_args(argv)
    derived = PROFILES[args.profile](yaml.safe_load(args.config.read_text()), checkpoint=args.checkpoint)
    if args.model_resource:
        derived = with_model_resource(derived, args.model_resource)
    text = yaml.safe_dump(derived, sort_keys=False)
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
