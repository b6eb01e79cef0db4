"""The wire models' own rules, as the server and both clients apply them (no Ray, no torch)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from client.errors import InvalidPromptError
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


# (the prompt fields of a request, what the refusal says): the rules of `check_prompt`, which the ingress applies
# as it parses a body, the clients as they build a request, and the model core to in-process callers.
MALFORMED_PROMPTS = [
    ({}, "exactly one prompt type.*none"),
    ({"text": "cat", "boxes": [[0, 0, 1, 1]], "labels": [1]}, "exactly one prompt type.*text, boxes"),
    ({"text": " "}, "non-empty string"),
    ({"text": []}, "non-empty string or a non-empty list"),
    ({"text": "cat", "labels": [1]}, "labels go with points or boxes, not with text"),
    ({"points": [[1, 2]]}, "labels are required with points"),
    ({"points": [[1, 2, 3]], "labels": [1]}, r"each point must be \[x, y\]"),
    ({"boxes": [], "labels": []}, "non-empty list"),
    ({"boxes": [[0, 0, 1, 1]], "labels": [1, 0]}, "one entry per box"),
    ({"boxes": [[0, 0, 1, 1]], "labels": [3]}, r"0 \(background\) or 1"),
    ({"box_sets": []}, "box_sets must be a non-empty list"),
    ({"box_sets": [{"boxes": [[0, 0, 1]], "labels": [1]}]}, r"each box must be"),
    ({"box_sets": [{"boxes": [[0, 0, 1, 1]], "labels": [1]}], "labels": [1]}, "not with box_sets"),
]


@pytest.mark.parametrize(("fields", "message"), MALFORMED_PROMPTS)
def test_a_request_holds_only_a_well_formed_prompt(fields, message):
    """Refused as the typed error the API documents (422 invalid_prompt), not as a validation error."""
    with pytest.raises(InvalidPromptError, match=message):
        SegmentRequest.model_validate_json(json.dumps({"image": "eA==", **fields}))
    with pytest.raises(InvalidPromptError, match=message):
        SegmentRequest(image=b"x", **fields)


@pytest.mark.parametrize(
    "fields",
    [
        {"text": ["cat", "dog"]},
        {"points": [[1, 2], [3.5, 4]], "labels": [1, 0]},
        {"boxes": [[0, 0, 1, 1]], "labels": [True]},
        {"box_sets": [{"boxes": [[0, 0, 1, 1]], "labels": [1]}, {"boxes": [[2, 2, 3, 3]], "labels": [0]}]},
    ],
)
def test_well_formed_prompts_are_taken(fields):
    assert SegmentRequest.model_validate_json(json.dumps({"image": "eA==", **fields})) == SegmentRequest(
        image=b"x", **fields
    )
