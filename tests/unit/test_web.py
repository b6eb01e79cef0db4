"""The pages the ingress serves (playground, Swagger UI) and its info, in-process: no Ray, no browser.

The module-level routes of the ingress's FastAPI app need no Serve replica, so a test client reaches
them directly; tests/browser renders the same pages in Chromium against the real application.
"""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from client.protocol import InfoResponse, ModelInfo
from deployments.config import AppArgs
from deployments.ingress import app
from deployments.web import PLAYGROUND_CSP, playground_html, service_info


@pytest.fixture(scope="module")
def http():
    return TestClient(app)


def test_service_info_lists_every_model_the_default_first_and_says_which_weights_are_random(tiny112_dir):
    args = AppArgs(models={"a-tuned": "facebook/sam3", "sam3": str(tiny112_dir)}, max_image_pixels=1000)
    info = service_info(args, api_key_required=True, image_sizes={"sam3": 112}, replicas_by_model={"sam3": 2})
    assert info == InfoResponse(
        checkpoint=tiny112_dir.name,
        random_weights=True,
        models=[
            ModelInfo(
                model_id="sam3", checkpoint=tiny112_dir.name, default=True, random_weights=True, image_size=112,
                loaded_replicas=2,
            ),
            ModelInfo(
                model_id="a-tuned", checkpoint="facebook/sam3", default=False, random_weights=False, image_size=None,
                loaded_replicas=0,
            ),
        ],
        api_key_required=True,
        score_threshold=0.5,
        max_image_pixels=1000,
        max_prompt_items=64,
        max_body_bytes=100_000_000,
    )
    real = service_info(AppArgs(models={"sam3": "facebook/sam3"}), False, {}, {})
    assert (real.checkpoint, real.random_weights, real.api_key_required) == ("facebook/sam3", False, False)


def test_a_checkpoint_directory_without_the_marker_is_not_random(tmp_path):
    info = service_info(AppArgs(models={"sam3": str(tmp_path / "sam3")}), False, {}, {})
    assert (info.checkpoint, info.random_weights) == (str(tmp_path / "sam3"), False), "not a directory: as given"
    (tmp_path / "sam3").mkdir()
    assert service_info(AppArgs(models={"sam3": str(tmp_path / "sam3")}), False, {}, {}).random_weights is False


def test_the_page_base_follows_the_route_prefix():
    assert '<base href="/">' in playground_html("")
    assert '<base href="/sam3/">' in playground_html("/sam3")
    assert '<base href="/a&quot;b/">' in playground_html('/a"b')


@pytest.mark.parametrize("path", ["/", "/playground"])
def test_the_playground_is_served_with_its_assets_and_nothing_from_elsewhere(http, path):
    page = http.get(path)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == PLAYGROUND_CSP
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert "static/playground/playground.js" in assets and "static/playground/playground.css" in assets
    for asset in assets:
        assert not asset.startswith(("http:", "https:", "//")), f"{asset} is not served by the application"
        if asset.startswith("static/"):
            assert http.get("/" + asset).status_code == 200


def test_swagger_ui_loads_its_assets_from_the_application(http):
    page = http.get("/docs")
    assert page.status_code == 200
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    names = ("favicon.png", "swagger-ui-bundle.js", "swagger-ui.css")
    assert sorted(assets) == [f"/static/docs/{name}" for name in names]
    for asset in assets:
        assert http.get(asset).status_code == 200
    assert "https://" not in page.text


def test_unknown_paths_keep_the_json_404(http):
    for path in ("/static/playground/missing.js", "/static/docs/missing.js", "/redoc", "/playground/x"):
        answer = http.get(path)
        assert answer.status_code == 404
        assert answer.json()["error"]["code"] == "not_found"


def test_the_pages_are_not_in_the_openapi_description():
    assert sorted(app.openapi()["paths"]) == [
        "/v1/health",
        "/v1/info",
        "/v1/ready",
        "/v1/segment",
        "/v1/videos",
        "/v1/videos/{session_id}",
        "/v1/videos/{session_id}/frames",
        "/v1/videos/{session_id}/prompts",
        "/v1/videos/{session_id}/track",
    ]


def test_every_reference_in_the_openapi_description_resolves(http):
    """The hand-parsed request body refers to its models under components (a `#/$defs/...` ref does not
    resolve from the document's root: Swagger UI could not show `box_sets`, and ReDoc refused the document)."""
    document = http.get("/openapi.json").json()

    def references(node):
        if isinstance(node, dict):
            yield from ([node["$ref"]] if "$ref" in node else [])
            for value in node.values():
                yield from references(value)
        elif isinstance(node, list):
            for value in node:
                yield from references(value)

    found = set(references(document))
    assert "#/components/schemas/BoxExemplars" in found
    assert "$defs" not in str(document)
    for reference in found:
        assert reference.startswith("#/components/schemas/"), reference
        assert reference.rsplit("/", 1)[1] in document["components"]["schemas"], reference
    body = document["paths"]["/v1/segment"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/SegmentRequest"}
