"""The wire models' own rules, as the server and both clients apply them (no Ray, no torch)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from client.protocol import SegmentRequest


@pytest.mark.parametrize(("max_instances", "kept"), [(None, None), (1, 1), (7, 7), ("3", 3), (2.0, 2)])
def test_max_instances_is_none_or_a_positive_integer(max_instances, kept):
    request = SegmentRequest(image=b"x", text="cat", max_instances=max_instances)
    assert request.max_instances == kept
    assert SegmentRequest.model_validate_json(request.model_dump_json()).max_instances == kept


def test_max_instances_defaults_to_every_instance():
    assert SegmentRequest(image=b"x", text="cat").max_instances is None


@pytest.mark.parametrize("max_instances", [0, -1, 2.5, "many"])
def test_max_instances_below_1_or_not_an_integer_is_refused(max_instances):
    with pytest.raises(ValidationError, match="max_instances"):
        SegmentRequest(image=b"x", text="cat", max_instances=max_instances)
    with pytest.raises(ValidationError, match="max_instances"):
        SegmentRequest.model_validate_json(json.dumps({"image": "eA==", "text": "cat", "max_instances": max_instances}))
