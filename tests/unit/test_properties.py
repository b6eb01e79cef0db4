"""Property tests (hypothesis, no Ray) on the wire format and the pure functions.

(The tests `note()` their inputs: schemathesis' pytest plugin blanks Hypothesis' own "Failing test case"
printout in every test of the session.)

Each property holds for every input hypothesis draws: round trips are exact, outputs keep their
documented shapes and dtypes, and malformed input fails only with the project's typed errors
(`client.errors`), never with a raw numpy, Pillow, pydantic or tokenizer exception.
"""

from __future__ import annotations

import base64
import io
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, note, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image
from pydantic import ValidationError

from client._api import segment_request
from client.errors import ImageTooLargeError, InvalidImageError, InvalidPromptError, Sam3Error
from client.protocol import RleMask, SegmentRequest, SegmentResponse
from client.rle import decode_mask, encode_mask
from sam3_serve_core.images import decode_image
from sam3_serve_core.masks import (
    concept_masks_to_uint8,
    order_by_score_descending,
    tracker_masks_to_uint8,
)
from sam3_serve_core.prompts import ConceptPrompt, PointPrompt, build_prompts
from tests.answers import assert_same_masks_off_threshold
from tests.conftest import tiny_checkpoint_dir

MODEL_SIZE = 56
TEXT_MAX_TOKENS = 32
FLOAT32_MAX = float(np.finfo(np.float32).max)
# Other test runs may share the machine: no deadlines or speed health checks, so timing never fails a test.
RELAXED = settings(
    deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)

# --- strategies -------------------------------------------------------------------------------------

huge_ints = st.sampled_from([2**31, 2**63 - 1, 2**63, -(2**63) - 1, 2**64, 10**30, -(10**40)])
numbers = st.one_of(
    st.integers(-1000, 1000),
    st.integers(),
    huge_ints,
    st.floats(),  # NaN, infinities, subnormals, values beyond float32
    st.floats(width=32),  # float32 extremes, which overflow when scaled or subtracted
    st.sampled_from([FLOAT32_MAX, -FLOAT32_MAX, 0.0, -0.0, 1e-45]),
)
json_scalars = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=20))
json_like = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=20,
)


@st.composite
def coordinate_lists(draw):
    """Nearly valid geometry: N items of 1..5 numbers each (mostly 2 or 4), so deep checks are reached."""
    size = draw(st.sampled_from([2, 4, 2, 4, 1, 3, 5]))
    return draw(st.lists(st.lists(numbers, min_size=size, max_size=size), max_size=4))


label_lists = st.lists(st.sampled_from([0, 1, 0, 1, True, False, 2, -1, 0.0, 1.0, 2**70, None, "1"]), max_size=5)
texts = st.text(max_size=300) | st.sampled_from(["a cat", " ", "", "\x00", "cat " * 40])
prompt_texts = st.none() | texts | json_like
prompt_geometry = st.none() | coordinate_lists() | json_like
prompt_labels = st.none() | label_lists | json_like
plausible_coordinates = st.integers(-50, 150) | st.floats(-1e3, 1e3)


@st.composite
def prompt_arguments(draw, geometry=prompt_geometry, labels=prompt_labels):
    """text / points / boxes / labels: anything at all half the time; otherwise one prompt type with
    labels of the right length, so that the deep checks and the success path are reached too."""
    if draw(st.sampled_from([True, False, False])):
        return {"text": draw(prompt_texts), "points": draw(geometry), "boxes": draw(geometry), "labels": draw(labels)}
    kind = draw(st.sampled_from(["text", "points", "boxes"]))
    arguments = {"text": None, "points": None, "boxes": None, "labels": None}
    if kind == "text":
        words = st.text("abcdefghijklmnopqrstuvwxyz -", min_size=1, max_size=24)
        text = draw(st.sampled_from([words, words, st.text(max_size=8), texts]))
        return {**arguments, "text": draw(text), "labels": draw(draw(st.sampled_from([st.none(), st.none(), labels])))}
    count = draw(st.integers(1, 6))
    size = 2 if kind == "points" else 4
    coordinates = draw(st.sampled_from([plausible_coordinates, plausible_coordinates, numbers]))
    items = draw(st.lists(st.lists(coordinates, min_size=size, max_size=size), min_size=count, max_size=count))
    if kind == "boxes" and draw(st.booleans()):  # ordered corners, as valid boxes have
        items = [sorted(box[::2]) + sorted(box[1::2]) for box in items]
        items = [[x0, y0, x1, y1] for x0, x1, y0, y1 in items]
    matching = st.lists(st.sampled_from([0, 1]), min_size=count, max_size=count)
    return {**arguments, kind: items, "labels": draw(draw(st.sampled_from([matching, matching, labels])))}

mask_shapes = st.tuples(st.integers(1, 64), st.integers(1, 64))
finite_floats = st.floats(allow_nan=False, allow_infinity=False)


@st.composite
def binary_masks(draw):
    """Masks of several dtypes, shapes 1..64 x 1..64, including all-zero, all-one and non-contiguous views."""
    shape = draw(mask_shapes)
    kind = draw(st.sampled_from(["random", "zeros", "ones"]))
    dtype = draw(st.sampled_from([np.bool_, np.uint8, np.int32, np.float32]))
    if kind == "zeros":
        mask = np.zeros(shape, dtype=dtype)
    elif kind == "ones":
        mask = np.ones(shape, dtype=dtype)
    else:
        mask = draw(hnp.arrays(dtype, shape))
    return mask.T if draw(st.booleans()) else mask


rle_masks = st.builds(RleMask, size=st.tuples(st.integers(0, 10**6), st.integers(0, 10**6)), counts=st.text())
boxes_xyxy = st.lists(st.tuples(finite_floats, finite_floats, finite_floats, finite_floats), max_size=4)


@st.composite
def well_formed_prompts(draw) -> dict:
    """One prompt type, as `check_prompt` requires: a text, or points or boxes with a 0/1 label each."""
    kind = draw(st.sampled_from(["text", "points", "boxes"]))
    if kind == "text":
        return {"text": draw(st.text(min_size=1, max_size=50).filter(str.strip))}
    size = 2 if kind == "points" else 4
    items = draw(st.lists(st.lists(finite_floats, min_size=size, max_size=size), min_size=1, max_size=4))
    return {kind: items, "labels": draw(st.lists(st.sampled_from([0, 1]), min_size=len(items), max_size=len(items)))}


@st.composite
def segment_requests(draw):
    return SegmentRequest(
        image=draw(st.binary(max_size=512) | st.just(b"")),
        **draw(well_formed_prompts()),
        return_detections=draw(st.booleans()),
        timeout_s=draw(st.none() | st.floats(min_value=0, exclude_min=True, allow_infinity=False)),
    )


@st.composite
def segment_responses(draw):
    return SegmentResponse(
        prompt_type=draw(st.sampled_from(["text", "points", "boxes"])),
        height=draw(st.integers()),
        width=draw(st.integers()),
        union_mask=draw(rle_masks),
        masks=draw(st.lists(rle_masks, max_size=3)),
        boxes=draw(boxes_xyxy),
        scores=draw(st.lists(finite_floats, max_size=4)),
    )


# --- RLE --------------------------------------------------------------------------------------------


@settings(RELAXED, max_examples=100)
@given(mask=binary_masks())
def test_rle_round_trip_is_exact(mask):
    rle = encode_mask(mask)
    assert rle.size == mask.shape
    decoded = decode_mask(rle)
    assert decoded.dtype == np.uint8
    assert decoded.shape == mask.shape
    assert decoded.flags.c_contiguous
    np.testing.assert_array_equal(decoded, np.where(mask != 0, 255, 0).astype(np.uint8))
    through_json = RleMask.model_validate_json(rle.model_dump_json())
    assert through_json == rle
    np.testing.assert_array_equal(decode_mask(through_json), decoded)


# --- wire models ------------------------------------------------------------------------------------


@settings(RELAXED, max_examples=100)
@given(wire_request=segment_requests())
def test_segment_request_json_round_trip(wire_request):
    wire = wire_request.model_dump_json()
    assert SegmentRequest.model_validate_json(wire) == wire_request
    # The image travels as base64 and comes back byte for byte; both alphabets are accepted on input.
    encoded = json.loads(wire)["image"]
    assert base64.urlsafe_b64decode(encoded) == wire_request.image
    for alphabet in (base64.b64encode, base64.urlsafe_b64encode):
        body = {**json.loads(wire), "image": alphabet(wire_request.image).decode("ascii")}
        assert SegmentRequest.model_validate_json(json.dumps(body)).image == wire_request.image


@settings(RELAXED, max_examples=50)
@given(
    wire_request=segment_requests(),
    name=st.text(min_size=1, max_size=20).filter(lambda name: name not in SegmentRequest.model_fields),
    value=json_like,
)
def test_segment_request_refuses_unknown_fields(wire_request, name, value):
    body = {**wire_request.model_dump(mode="json"), name: value}
    with pytest.raises(ValidationError):
        SegmentRequest.model_validate_json(json.dumps(body))
    with pytest.raises(ValidationError):
        SegmentRequest.model_validate({**wire_request.model_dump(), name: value})


@settings(RELAXED, max_examples=50)
@given(
    wire_request=segment_requests(),
    field=st.sampled_from(["points", "boxes"]),
    bad=st.sampled_from([float("nan"), float("inf"), float("-inf")]),
)
def test_non_finite_coordinates_are_refused_after_json_never_changed(wire_request, field, bad):
    """JSON has no NaN or infinity: such a value becomes null and is then refused, never silently replaced."""
    poisoned = wire_request.model_copy(update={field: [[bad, 1.0]]})
    with pytest.raises(ValidationError):
        SegmentRequest.model_validate_json(poisoned.model_dump_json())


@settings(RELAXED, max_examples=100)
@given(response=segment_responses())
def test_segment_response_json_round_trip(response):
    assert SegmentResponse.model_validate_json(response.model_dump_json()) == response
    body = {**response.model_dump(mode="json"), "extra": 1}
    with pytest.raises(ValidationError):
        SegmentResponse.model_validate_json(json.dumps(body))


# --- decode_image -----------------------------------------------------------------------------------


def _check_rgb(rgb: np.ndarray) -> None:
    assert isinstance(rgb, np.ndarray)
    assert rgb.dtype == np.uint8
    assert rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.shape[0] >= 1 and rgb.shape[1] >= 1
    assert rgb.flags.c_contiguous


@settings(RELAXED, max_examples=100)
@given(data=st.binary(max_size=2048))
def test_decode_image_on_arbitrary_bytes_raises_only_typed_errors(data):
    note(f"data={data!r}")
    try:
        rgb = decode_image(data)
    except (InvalidImageError, ImageTooLargeError):
        return
    _check_rgb(rgb)


def _encoded(fmt: str) -> bytes:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (9, 7, 4), dtype=np.uint8), "RGBA")
    if fmt in ("JPEG", "BMP", "PPM"):
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


VALID_FILES = {fmt: _encoded(fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM")}


@pytest.mark.filterwarnings("ignore::UserWarning:PIL.TiffImagePlugin")  # Pillow's notes on corrupt tags
@settings(RELAXED, max_examples=100)
@given(
    original=st.sampled_from(sorted(VALID_FILES)).map(VALID_FILES.get),
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6),
    cut=st.none() | st.integers(0, 10**6),
)
def test_decode_image_on_corrupted_files_raises_only_typed_errors(original, edits, cut):
    """Real files with flipped bytes and truncations reach deep into Pillow's format plugins."""
    note(f"format={original[:8]!r} edits={edits!r} cut={cut!r}")
    data = bytearray(original)
    for position, value in edits:
        data[position % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    try:
        rgb = decode_image(bytes(data), max_pixels=1_000_000)
    except (InvalidImageError, ImageTooLargeError):
        return
    _check_rgb(rgb)
    assert rgb.shape[0] * rgb.shape[1] <= 1_000_000


@settings(RELAXED, max_examples=100)
@given(
    array=st.tuples(st.integers(1, 12), st.integers(1, 12), st.sampled_from([None, 1, 3, 4])).flatmap(
        lambda shape: hnp.arrays(np.uint8, shape[:2] if shape[2] is None else shape)
    ),
    transpose=st.booleans(),
)
def test_decode_image_on_uint8_arrays(array, transpose):
    if transpose:  # a non-contiguous view
        array = array.swapaxes(0, 1)
    before = array.copy()
    rgb = decode_image(array)
    _check_rgb(rgb)
    assert rgb.shape == (*array.shape[:2], 3)
    assert not np.shares_memory(rgb, array)
    np.testing.assert_array_equal(array, before)
    channels = 1 if array.ndim == 2 else array.shape[2]
    if channels == 1:
        gray = array.reshape(array.shape[:2])
        for channel in range(3):
            np.testing.assert_array_equal(rgb[..., channel], gray)
    elif channels == 3:
        np.testing.assert_array_equal(rgb, array)
    else:  # composited onto white: opaque pixels are kept, transparent ones become white
        opaque, transparent = array[..., 3] == 255, array[..., 3] == 0
        np.testing.assert_array_equal(rgb[opaque], array[..., :3][opaque])
        assert (rgb[transparent] == 255).all()


# --- build_prompt -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_checkpoint_dir(MODEL_SIZE))


def _check_labels(labels: np.ndarray, count: int) -> None:
    assert labels.dtype == np.int64 and labels.shape == (count,)
    assert np.isin(labels, (0, 1)).all()


@settings(RELAXED, max_examples=100)
@given(
    arguments=prompt_arguments(),
    height=st.integers(1, 100),
    width=st.integers(1, 100),
    max_items=st.none() | st.integers(1, 5),
)
# Finite float32 coordinates that overflow to infinity once scaled to the model size or turned into
# box widths: the model would get non-finite inputs.
@example(
    arguments={"text": None, "points": [[FLOAT32_MAX, 1.0]], "boxes": None, "labels": [1]},
    height=1,
    width=1,
    max_items=None,
)
@example(
    arguments={"text": None, "points": None, "boxes": [[-FLOAT32_MAX, 0, FLOAT32_MAX, 1]], "labels": [1]},
    height=1,
    width=1,
    max_items=None,
)
def test_build_prompt_raises_only_invalid_prompt_or_returns_documented_arrays(
    tokenizer, arguments, height, width, max_items
):
    note(f"arguments={arguments!r} height={height} width={width} max_items={max_items}")
    text, points, boxes = arguments["text"], arguments["points"], arguments["boxes"]
    try:
        (prompt,) = build_prompts(
            **arguments,
            tokenizer=tokenizer,
            text_max_tokens=TEXT_MAX_TOKENS,
            model_size=MODEL_SIZE,
            height=height,
            width=width,
            max_items=max_items,
        )
    except InvalidPromptError:  # PromptTooLongError is a subclass
        return
    given_types = [value for value in (text, points, boxes) if value is not None]
    assert len(given_types) == 1
    if text is not None or boxes is not None:
        assert isinstance(prompt, ConceptPrompt)
        for tokens in (prompt.text.input_ids, prompt.text.attention_mask):
            assert tokens.dtype == np.int64 and tokens.shape == (TEXT_MAX_TOKENS,)
        assert np.isin(prompt.text.attention_mask, (0, 1)).all()
    if text is not None:
        assert isinstance(text, str) and text.strip()
        assert prompt.boxes_cxcywh is None and prompt.box_labels is None
    elif boxes is not None:
        count = len(boxes)
        assert max_items is None or count <= max_items
        assert prompt.boxes_cxcywh.dtype == np.float32 and prompt.boxes_cxcywh.shape == (count, 4)
        assert np.isfinite(prompt.boxes_cxcywh).all(), prompt.boxes_cxcywh
        _check_labels(prompt.box_labels, count)
    else:
        assert isinstance(prompt, PointPrompt)
        count = len(points)
        assert max_items is None or count <= max_items
        assert prompt.points.dtype == np.float32 and prompt.points.shape == (count, 2)
        assert np.isfinite(prompt.points).all(), prompt.points
        _check_labels(prompt.labels, count)


# --- masks ------------------------------------------------------------------------------------------


@st.composite
def mask_logits(draw):
    count = draw(st.integers(0, 5))
    low = draw(st.tuples(st.integers(1, 16), st.integers(1, 16)))
    elements = st.floats(-50, 50, width=32) | st.floats(width=32)  # mostly moderate, sometimes NaN / inf
    return torch.from_numpy(draw(hnp.arrays(np.float32, (count, *low), elements=elements)))


@settings(RELAXED, max_examples=100)
@given(
    logits=mask_logits(),
    size=st.tuples(st.integers(1, 40), st.integers(1, 40)),
    chunk=st.integers(1, 4),
    function=st.sampled_from([concept_masks_to_uint8, tracker_masks_to_uint8]),
)
def test_masks_to_uint8_shape_values_and_chunking_off_the_threshold(logits, size, chunk, function):
    height, width = size
    masks = function(logits, height, width, chunk_size=chunk)
    assert isinstance(masks, np.ndarray)
    assert masks.dtype == np.uint8 and masks.shape == (logits.shape[0], height, width)
    assert np.isin(masks, (0, 255)).all()
    all_at_once = function(logits, height, width, chunk_size=max(1, logits.shape[0]))
    assert_same_masks_off_threshold(masks, all_at_once, logits, height, width, function)
    assert_same_masks_off_threshold(masks, function(logits, height, width, chunk_size=1), logits, height, width, function)


@settings(RELAXED, max_examples=100)
@given(scores=st.lists(st.sampled_from([0.0, 0.5, 1.0]) | st.floats(allow_nan=False, width=32), max_size=30))
def test_order_by_score_descending_is_a_stable_sorting_permutation(scores):
    tensor = torch.tensor(scores, dtype=torch.float32)
    order = order_by_score_descending(tensor).tolist()
    assert sorted(order) == list(range(len(scores)))
    ordered = tensor[order].tolist() if scores else []
    assert all(a >= b for a, b in zip(ordered, ordered[1:]))
    for a, b in zip(order, order[1:]):  # tied scores keep their query order
        if tensor[a] == tensor[b]:
            assert a < b


# --- client argument handling -----------------------------------------------------------------------

CLIENT_IMAGE = np.random.default_rng(3).integers(0, 256, (5, 6, 3), dtype=np.uint8)
client_geometry = prompt_geometry | hnp.arrays(
    st.sampled_from([np.float32, np.float64, np.int64, np.uint8, np.bool_]),
    hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
)
client_labels = prompt_labels | hnp.arrays(
    st.sampled_from([np.int64, np.int32, np.uint8, np.float32, np.bool_]),
    hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=4),
)


@st.composite
def client_arguments(draw):
    """The prompt under its name or its alias (or both), as lists or numpy arrays."""
    arguments = draw(prompt_arguments(geometry=client_geometry, labels=client_labels))
    if draw(st.booleans()):
        arguments["text_prompt"] = arguments.pop("text") if draw(st.booleans()) else draw(st.none() | texts)
    if draw(st.booleans()):
        arguments["prompts"] = arguments.pop("points") if draw(st.booleans()) else draw(st.none() | client_geometry)
    for name in ("points", "prompts", "boxes", "labels"):
        value = arguments.get(name)
        if isinstance(value, list) and draw(st.booleans()):
            try:
                arguments[name] = np.array(value)
            except (ValueError, OverflowError):
                pass
    return arguments


@settings(RELAXED, max_examples=100)
@given(
    arguments=client_arguments(),
    timeout=st.none() | st.floats(),
    model_id=st.none() | st.sampled_from(["sam3", "sam2", ""]),
    return_detections=st.booleans(),
)
# NaN is accepted by the client's checks, but JSON has no NaN: the HTTP client would send `null`.
@example(
    arguments={"text": None, "points": [[0.0, float("nan")]], "boxes": None, "labels": [1]},
    timeout=None,
    model_id=None,
    return_detections=True,
)
def test_client_arguments_raise_only_typed_errors_or_make_a_valid_request(
    arguments, timeout, model_id, return_detections
):
    note(f"arguments={arguments!r} timeout={timeout!r} model_id={model_id!r}")
    try:
        request = segment_request(
            CLIENT_IMAGE,
            **arguments,
            timeout=timeout,
            model_id=model_id,
            return_detections=return_detections,
        )
    except Sam3Error:
        return
    assert isinstance(request, SegmentRequest)
    # What the HTTP client sends must come back as the same request (an infinite timeout is "none").
    try:
        over_http = SegmentRequest.model_validate_json(request.model_dump_json())
    except ValidationError as error:
        sent = request.model_dump(exclude={"image"})
        pytest.fail(f"the client built a request that does not survive JSON: {sent}\n{error}")
    no_timeout = request.timeout_s is not None and math.isinf(request.timeout_s)
    assert over_http == (request.model_copy(update={"timeout_s": None}) if no_timeout else request)
    kinds = [name for name in ("text", "points", "boxes") if getattr(request, name) is not None]
    assert kinds == [request.prompt_type]
    if request.text is not None:
        assert request.text.strip() and request.labels is None
    else:
        items = request.points if request.points is not None else request.boxes
        assert items and all(len(item) == (2 if request.points is not None else 4) for item in items)
        assert request.labels is not None and len(request.labels) == len(items)
        assert set(request.labels) <= {0, 1}
    assert request.return_detections == return_detections
    assert request.timeout_s == timeout
    np.testing.assert_array_equal(decode_image(request.image), CLIENT_IMAGE)  # PNG: lossless
