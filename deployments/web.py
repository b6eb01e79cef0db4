"""What the ingress serves to people rather than programs: the playground page and the API docs.

Static files only, no build step and no CDN, so both work on a cluster with no internet: the playground
ships in this package (`deployments/playground/`), and Swagger UI's assets come from the `fastapi-offline`
package (FastAPI's own `/docs` loads them from a CDN, and is blank offline).
"""

# No `from __future__ import annotations` here: FastAPI must resolve the route annotations at import.

import html
from collections.abc import Mapping
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from client.protocol import InfoResponse, ModelInfo
from deployments.config import AppArgs
from sam3_serve_core.checkpoint_marker import is_tiny_checkpoint

PLAYGROUND_PATHS = ("/", "/playground")
DOCS_PATH = "/docs"
PLAYGROUND_ASSETS_PATH = "/static/playground"
DOCS_ASSETS_PATH = "/static/docs"
PLAYGROUND_DIR = Path(__file__).with_name("playground")
PLAYGROUND_TEMPLATE = (PLAYGROUND_DIR / "index.html").read_text()
# The page loads and fetches from its own origin only; images and downloads are blob: URLs.
PLAYGROUND_CSP = (
    "default-src 'self'; img-src 'self' blob: data:; base-uri 'self'; form-action 'none'; frame-ancestors 'none'"
)


def checkpoint_name(checkpoint: str) -> str:
    """A directory is named by its last part, not its path, which says nothing to callers about the model."""
    return Path(checkpoint).name if Path(checkpoint).is_dir() else checkpoint


def service_info(
    args: AppArgs, api_key_required: bool, image_sizes: Mapping[str, int], replicas_by_model: Mapping[str, int]
) -> InfoResponse:
    """`/v1/info` from the configuration and what is known now: each model's resolution (`image_sizes`, empty
    while unknown) and how many model replicas hold it."""
    models = [
        ModelInfo(
            model_id=model_id,
            checkpoint=checkpoint_name(checkpoint),
            default=model_id == args.default_model,
            random_weights=is_tiny_checkpoint(checkpoint),
            image_size=image_sizes.get(model_id),
            loaded_replicas=replicas_by_model.get(model_id, 0),
        )
        for model_id, checkpoint in sorted(args.models.items(), key=lambda entry: entry[0] != args.default_model)
    ]
    return InfoResponse(
        checkpoint=models[0].checkpoint,
        random_weights=models[0].random_weights,
        models=models,
        api_key_required=api_key_required,
        score_threshold=args.score_threshold,
        max_image_pixels=args.max_image_pixels,
        max_prompt_items=args.max_prompt_items,
        max_body_bytes=args.max_body_bytes,
    )


def root_of(request: Request) -> str:
    """The application's root (Serve's route prefix), so that the pages work under any prefix."""
    return request.scope.get("root_path", "").rstrip("/")


def playground_html(root: str) -> str:
    """The page with its `<base>` at the application's root: its relative URLs (assets, API) follow the prefix."""
    return PLAYGROUND_TEMPLATE.replace("{{BASE}}", html.escape(root + "/"))


def add_pages(app: FastAPI) -> None:
    """The playground at / and /playground, Swagger UI at /docs: none of them in the OpenAPI description."""
    app.mount(PLAYGROUND_ASSETS_PATH, StaticFiles(directory=PLAYGROUND_DIR / "static"), name="playground-assets")
    app.mount(DOCS_ASSETS_PATH, StaticFiles(packages=[("fastapi_offline", "static")]), name="docs-assets")

    async def playground(request: Request) -> HTMLResponse:
        return HTMLResponse(playground_html(root_of(request)), headers={"Content-Security-Policy": PLAYGROUND_CSP})

    for path in PLAYGROUND_PATHS:
        app.add_api_route(path, playground, methods=["GET"], include_in_schema=False)

    @app.get(DOCS_PATH, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = root_of(request)
        return get_swagger_ui_html(
            openapi_url=root + app.openapi_url,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{DOCS_ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_ASSETS_PATH}/favicon.png",
        )
