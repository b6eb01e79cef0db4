"""The application builder that `serve_config.yaml` names: `import_path: deployments.app:build_app`.

The deployments' options (resources, replicas, autoscaling, batching, routing) are set in `serve_config.yaml`
alone, never in the `@serve.deployment` decorators: one place to read and change them, and no defaults in
code that drift from the file. Run the application with that file or a profile made from it
(`python -m tools.profiles`).
"""

# No `from __future__ import annotations`: Serve validates `args` against the builder's annotation,
# which must be the AppArgs class itself, not a string.

from ray.serve import Application

from deployments.config import AppArgs
from deployments.ingress import Sam3Ingress
from deployments.model_pool import Sam3ModelPool
from deployments.postprocessor import Sam3Postprocessor
from deployments.preprocessor import Sam3Preprocessor


def build_app(args: AppArgs) -> Application:
    """HTTP ingress -> CPU preprocessor -> GPU model pool -> CPU postprocessor, wired in one expression."""
    return Sam3Ingress.bind(
        Sam3Preprocessor.bind(args), Sam3ModelPool.bind(args), Sam3Postprocessor.bind(args), args
    )
