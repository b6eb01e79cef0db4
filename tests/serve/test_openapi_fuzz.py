"""Schemathesis against the OpenAPI description the running ingress publishes.

The real multi-process application is started from serve_config.yaml's CPU profile (as in
test_application.py); schemathesis sends generated requests, valid and invalid, to every operation the
description declares. Every answer must be a declared status (never a 5xx), with the declared content
type and a body that matches the declared schema for that status.

The schema-parametrized test needs the description at collection time, so it is taken from the ingress's
FastAPI app, and a test checks it is exactly what the running ingress serves at `/openapi.json`.
(Schemathesis' lazy `from_fixture` loader reads `Node._nodeid`, which pytest 9.2 no longer has.)

A 5xx is allowed only as the declared 504 for a request that gave itself a tiny `timeout_s`.
"""

from __future__ import annotations

import base64
import copy
import io
import json

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from client.protocol import SEGMENT_PATH
from client.video_protocol import VIDEOS_PATH
from deployments.ingress import app as ingress_app
from tests.conftest import random_image

# A request may set its own time budget (`timeout_s`, any positive number): a tiny one is answered with
# the declared 504, which is the caller's doing, not a server error. Any other 5xx fails.
CALLER_TIMEOUT_BELOW_S = 5.0


def no_server_error(ctx, response, case):
    """`not_a_server_error`, except a 504 for a request that gave itself less than a few seconds."""
    timeout_s = case.body.get("timeout_s") if isinstance(case.body, dict) else None
    if (
        response.status_code == 504
        and isinstance(timeout_s, (int, float))
        and not isinstance(timeout_s, bool)
        and 0 < timeout_s < CALLER_TIMEOUT_BELOW_S
    ):
        return None
    return not_a_server_error(ctx, response, case)


CHECKS = [no_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
FUZZ_SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture],
)


def _png_base64(height: int, width: int) -> str:
    buffer = io.BytesIO()
    Image.fromarray(random_image(height, width, seed=11)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# Real images, so generated prompts also reach the model and post-processing (a 1 x 1 image makes
# scaled coordinates largest).
REAL_IMAGES = [_png_base64(24, 32), _png_base64(1, 1)]


@pytest.fixture(scope="module")
def live_schema(app_url):
    """The description the running ingress serves."""
    return schemathesis.openapi.from_url(f"{app_url}/openapi.json")


SESSION_PATH = VIDEOS_PATH + "/{session_id}"
DESCRIPTION = json.loads(json.dumps(ingress_app.openapi()))
schema = schemathesis.openapi.from_dict(copy.deepcopy(DESCRIPTION))


def test_the_running_ingress_serves_the_fuzzed_description(app_url, live_schema):
    served = httpx.get(f"{app_url}/openapi.json", timeout=30)
    assert served.status_code == 200
    assert served.json() == DESCRIPTION
    operations = sorted((op.method.upper(), op.path) for op in (r.ok() for r in live_schema.get_all_operations()))
    videos = [
        ("DELETE", SESSION_PATH),
        ("GET", SESSION_PATH),
        ("POST", VIDEOS_PATH),
        ("POST", f"{SESSION_PATH}/frames"),
        ("POST", f"{SESSION_PATH}/prompts"),
        ("POST", f"{SESSION_PATH}/track"),
    ]
    assert operations == sorted([("GET", "/v1/health"), ("GET", "/v1/info"), ("GET", "/v1/ready"), ("POST", SEGMENT_PATH), *videos])


@schema.parametrize()
@FUZZ_SETTINGS
def test_every_operation_conforms_to_its_schema(case, app_url):
    """Examples, coverage (boundary and negative cases) and random fuzzing, for every operation."""
    case.call_and_validate(base_url=app_url, checks=CHECKS, timeout=60)


# Prompts of the right shape (any numbers, including float32's extremes), so that many requests pass
# validation and reach the model and post-processing.
FLOAT32_MAX = float(np.finfo(np.float32).max)
coordinates = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(-(10**6), 10**6),
    st.sampled_from([FLOAT32_MAX, -FLOAT32_MAX, 0.0, 1e-45]),
)


def _geometry(name: str, size: int) -> st.SearchStrategy[dict]:
    return st.integers(1, 4).flatmap(
        lambda count: st.fixed_dictionaries(
            {
                name: st.lists(st.lists(coordinates, min_size=size, max_size=size), min_size=count, max_size=count),
                "labels": st.lists(st.sampled_from([0, 1]), min_size=count, max_size=count),
            }
        )
    )


well_formed_prompts = st.one_of(
    st.fixed_dictionaries({"text": st.text(min_size=1, max_size=40)}),
    _geometry("points", 2),
    _geometry("boxes", 4),
)
PROMPT_FIELDS = ("text", "points", "boxes", "labels")


@pytest.mark.parametrize("image", REAL_IMAGES, ids=["24x32", "1x1"])
def test_segment_with_a_real_image_conforms_to_its_schema(live_schema, app_url, image):
    """Generated bodies on a decodable image, half of them with a well-formed prompt, so the answers
    also come from the model and post-processing, not only from validation."""

    operation = live_schema[SEGMENT_PATH]["POST"]

    @FUZZ_SETTINGS
    @given(case=operation.as_strategy(), prompt=st.none() | well_formed_prompts)
    # A box far outside the image, but finite: it passes validation and reached torchvision's roi_align,
    # which raised (ValueError: cannot create std::vector larger than max_size()) -> 500.
    @example(
        case=operation.Case(body={"image": image}, media_type="application/json"),
        prompt={"boxes": [[0, 0, 1e20, 1]], "labels": [1]},
    )
    def check(case, prompt):
        if isinstance(case.body, dict):
            body = {**case.body, "image": image}
            if prompt is not None:
                body = {**{k: v for k, v in body.items() if k not in PROMPT_FIELDS}, **prompt}
            case.body = body
        case.call_and_validate(base_url=app_url, checks=CHECKS, timeout=60)

    check()
