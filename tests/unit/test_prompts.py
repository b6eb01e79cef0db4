"""Unit tests for sam3_serve_core.prompts (no Ray, no model weights).

Every conversion is compared bit-exactly with transformers' own `Sam3Processor` (text, box exemplars)
and `Sam3TrackerProcessor` (points), loaded from the tiny checkpoint's processor files, which carry the
real CLIP BPE tokenizer.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import AutoTokenizer, Sam3Processor, Sam3TrackerProcessor

from client.errors import InvalidPromptError, InvalidRequestError, PromptTooLongError
from sam3_serve_core.prompts import (
    BOXES_ONLY_TEXT,
    PAD_VALUE,
    ConceptPrompt,
    PointPrompt,
    TokenizedText,
    box_exemplars,
    build_prompts,
    pad_box_exemplars,
    scale_points,
    tokenize,
)
from tests.conftest import random_image, tiny_checkpoint_dir

MODEL_SIZE = 112
MAX_TOKENS = 32
CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]  # "a photo of a cat" with start / end markers

# (height, width): non-square both ways, square, tiny, odd.
IMAGE_SIZES = [(40, 60), (60, 40), (112, 112), (37, 113), (480, 640), (1, 1), (7, 3)]


@pytest.fixture(scope="module")
def checkpoint_dir():
    return tiny_checkpoint_dir(MODEL_SIZE)


@pytest.fixture(scope="module")
def tokenizer(checkpoint_dir):
    return AutoTokenizer.from_pretrained(checkpoint_dir)


@pytest.fixture(scope="module")
def processor(checkpoint_dir):
    return Sam3Processor.from_pretrained(checkpoint_dir)


@pytest.fixture(scope="module")
def tracker_processor(checkpoint_dir):
    return Sam3TrackerProcessor.from_pretrained(checkpoint_dir)


def _image(height: int, width: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(random_image(height, width, seed))


def _build(tokenizer, height=40, width=60, **kwargs):
    prompt = {"text": None, "points": None, "boxes": None, "labels": None}
    prompt.update(kwargs)
    (built,) = build_prompts(
        **prompt,
        tokenizer=tokenizer,
        text_max_tokens=MAX_TOKENS,
        model_size=MODEL_SIZE,
        height=height,
        width=width,
    )
    return built


# --- tokenize ------------------------------------------------------------------------------------


def test_tokenize_real_clip_ids(tokenizer):
    out = tokenize(tokenizer, "a photo of a cat", MAX_TOKENS)
    assert isinstance(out, TokenizedText)
    assert out.input_ids.dtype == np.int64 and out.attention_mask.dtype == np.int64
    assert out.input_ids.shape == (MAX_TOKENS,) and out.attention_mask.shape == (MAX_TOKENS,)
    assert out.input_ids[: len(CAT_IDS)].tolist() == CAT_IDS
    # CLIP pads with its end-of-text token.
    assert out.input_ids[len(CAT_IDS) :].tolist() == [tokenizer.pad_token_id] * (MAX_TOKENS - len(CAT_IDS))
    assert out.attention_mask.tolist() == [1] * len(CAT_IDS) + [0] * (MAX_TOKENS - len(CAT_IDS))


@pytest.mark.parametrize(
    "text", ["a photo of a cat", "cat", "visual", "A Red  CAR, parked!", "zebra-crossing stripes", "cat " * 30]
)
def test_tokenize_matches_processor(tokenizer, processor, text):
    out = tokenize(tokenizer, text, MAX_TOKENS)
    expected = processor(text=text, return_tensors="np")
    np.testing.assert_array_equal(out.input_ids, expected["input_ids"][0])
    np.testing.assert_array_equal(out.attention_mask, expected["attention_mask"][0])


def test_cat_is_one_token(tokenizer):
    assert len(tokenizer("cat").input_ids) == 3


def test_tokenize_exactly_max_tokens_passes(tokenizer):
    out = tokenize(tokenizer, "cat " * 30, MAX_TOKENS)  # 30 words + start + end = 32
    assert out.input_ids.shape == (MAX_TOKENS,)
    assert out.attention_mask.tolist() == [1] * MAX_TOKENS
    assert out.input_ids[0] == CAT_IDS[0] and out.input_ids[-1] == CAT_IDS[-1]


def test_tokenize_one_token_too_many_raises(tokenizer):
    with pytest.raises(PromptTooLongError) as info:
        tokenize(tokenizer, "cat " * 31, MAX_TOKENS)  # 33 tokens
    assert isinstance(info.value, InvalidPromptError)
    assert isinstance(info.value, InvalidRequestError)
    assert "33" in info.value.message and "32" in info.value.message
    assert info.value.code == "prompt_too_long"


def test_tokenize_much_too_long_raises(tokenizer):
    with pytest.raises(PromptTooLongError):
        tokenize(tokenizer, "a very long prompt " * 100, MAX_TOKENS)


@pytest.mark.parametrize("text", ["", " ", "   \t\n ", "\n"])
def test_tokenize_empty_raises(tokenizer, text):
    with pytest.raises(InvalidPromptError):
        tokenize(tokenizer, text, MAX_TOKENS)


@pytest.mark.parametrize("text", [None, 3, 1.5, b"cat", ["cat"], {"text": "cat"}])
def test_tokenize_non_string_raises(tokenizer, text):
    with pytest.raises(InvalidPromptError):
        tokenize(tokenizer, text, MAX_TOKENS)


# --- box_exemplars -------------------------------------------------------------------------------

# In fractions of the image's width and height, scaled to each image size by `in_pixels`.
BOX_CASES = [
    ([[1 / 60, 2 / 40, 30 / 60, 20 / 40]], [1]),
    ([[0, 0, 1, 1]], [0]),
    ([[1.5 / 60, 2.25 / 40, 30.75 / 60, 20.125 / 40], [5 / 60, 5 / 40, 6 / 60, 6 / 40], [0.1, 0.2, 0.3, 0.4]], [1, 0, 1]),
    # Outside the image, within one image size of it: accepted and not clipped.
    ([[-0.1, -0.08, 1.2, 1.1], [-1.0, -0.5, 2.0, 1.9]], [1, 1]),
]


def in_pixels(fractions, height: int, width: int) -> list[list[float]]:
    return [[value * (width if axis % 2 == 0 else height) for axis, value in enumerate(item)] for item in fractions]


@pytest.mark.parametrize("height,width", IMAGE_SIZES)
@pytest.mark.parametrize("boxes,labels", BOX_CASES)
def test_box_exemplars_match_processor(processor, height, width, boxes, labels):
    boxes = in_pixels(boxes, height, width)
    cxcywh, out_labels = box_exemplars(boxes, labels, height, width)
    expected = processor(
        images=_image(height, width), input_boxes=[boxes], input_boxes_labels=[labels], return_tensors="pt"
    )
    assert cxcywh.dtype == np.float32 and cxcywh.shape == (len(boxes), 4)
    assert out_labels.dtype == np.int64 and out_labels.shape == (len(boxes),)
    assert torch.equal(torch.from_numpy(cxcywh), expected["input_boxes"][0])
    assert torch.equal(torch.from_numpy(out_labels), expected["input_boxes_labels"][0])


@pytest.mark.parametrize("as_type", [np.array, torch.tensor, tuple])
def test_box_exemplars_accepts_arrays(processor, as_type):
    boxes = [[1.5, 2.0, 30.0, 20.5], [3.0, 4.0, 10.0, 11.0]]
    labels = [1, 0]
    if as_type is tuple:
        arg_boxes, arg_labels = tuple(tuple(b) for b in boxes), tuple(labels)
    else:
        arg_boxes, arg_labels = as_type(boxes), as_type(labels)
    cxcywh, out_labels = box_exemplars(arg_boxes, arg_labels, 40, 60)
    expected = processor(images=_image(40, 60), input_boxes=[boxes], input_boxes_labels=[labels], return_tensors="pt")
    assert torch.equal(torch.from_numpy(cxcywh), expected["input_boxes"][0])
    assert out_labels.tolist() == labels


def test_box_exemplars_outside_image_not_clipped():
    cxcywh, _ = box_exemplars([[-20, -10, 110, 70]], [1], 40, 60)
    np.testing.assert_allclose(cxcywh[0], [45 / 60, 30 / 40, 130 / 60, 80 / 40], rtol=1e-6)
    assert cxcywh[0, 2] > 1 and cxcywh[0, 3] > 1


@pytest.mark.parametrize(
    "boxes", [[[0, 0, 121, 10]], [[-61, 0, 10, 10]], [[0, -41, 10, 10]], [[0, 0, 10, 81]], [[0, 0, 1e20, 1]]]
)
def test_box_exemplars_far_outside_the_image_are_refused(boxes):
    with pytest.raises(InvalidPromptError, match="within one image size"):
        box_exemplars(boxes, [1], 40, 60)


@pytest.mark.parametrize("points", [[[121, 0]], [[-61, 0]], [[0, 81]], [[0, -41]], [[3.4e38, 1]]])
def test_points_far_outside_the_image_are_refused(points):
    with pytest.raises(InvalidPromptError, match="within one image size"):
        scale_points(points, [1], 40, 60, MODEL_SIZE)


def test_box_exemplars_pad_value_coordinate_is_normalized():
    # transformers' `Sam3Processor` leaves a box with any coordinate equal to its pad value (-10)
    # un-normalized (it mistakes it for padding); this code normalizes it like any other box.
    cxcywh, _ = box_exemplars([[-10, 0, 10, 10]], [1], 20, 20)
    assert torch.equal(torch.from_numpy(cxcywh), torch.tensor([[0.0, 0.25, 1.0, 0.5]]))


def test_box_exemplars_labels_bool_accepted():
    _, labels = box_exemplars([[0, 0, 10, 10], [1, 1, 5, 5]], [True, False], 20, 20)
    assert labels.dtype == np.int64 and labels.tolist() == [1, 0]


def test_box_exemplars_does_not_modify_input():
    boxes = np.array([[1.0, 2.0, 30.0, 20.0]], dtype=np.float32)
    before = boxes.copy()
    box_exemplars(boxes, [1], 40, 60)
    np.testing.assert_array_equal(boxes, before)


BAD_BOXES = {
    "zero_width": [[5, 5, 5, 10]],
    "zero_height": [[5, 5, 10, 5]],
    "point_box": [[5, 5, 5, 5]],
    "inverted_x": [[10, 5, 5, 10]],
    "inverted_y": [[5, 10, 10, 5]],
    "one_of_two_inverted": [[0, 0, 10, 10], [10, 10, 0, 0]],
    "nan": [[0, 0, float("nan"), 10]],
    "inf": [[0, 0, float("inf"), 10]],
    "neg_inf": [[float("-inf"), 0, 10, 10]],
    "flat": [0, 0, 10, 10],
    "three_coords": [[1, 2, 3]],
    "five_coords": [[1, 2, 3, 4, 5]],
    "empty": [],
    "empty_row": [[]],
    "ragged": [[0, 0, 10, 10], [0, 0, 10]],
    "three_d": [[[0, 0, 10, 10]]],
    "scalar": 5,
    "string": "0,0,10,10",
    "non_numeric_strings": [["a", "b", "c", "d"]],
    "dict": {"x0": 0},
    "none_inside": [[None, 0, 10, 10]],
    "nested_dict": [[{}, 0, 10, 10]],
    "complex": [[0, 0, 10, 10j]],
}


@pytest.mark.parametrize("boxes", list(BAD_BOXES.values()), ids=list(BAD_BOXES))
def test_box_exemplars_bad_boxes_raise(boxes):
    labels = [1] * (len(boxes) if isinstance(boxes, list) and boxes and isinstance(boxes[0], list) else 1)
    with pytest.raises(InvalidPromptError):
        box_exemplars(boxes, labels, 40, 60)


BAD_LABELS = {
    "too_few": [1],
    "too_many": [1, 0, 1],
    "empty": [],
    "two": [1, 2],
    "minus_one": [1, -1],
    "half": [1, 0.5],
    "pad_value": [1, -10],
    "nested": [[1], [0]],
    "scalar": 1,
    "string": ["1", "0"],
    "none": [None, 1],
    "text": "10",
}


@pytest.mark.parametrize("labels", list(BAD_LABELS.values()), ids=list(BAD_LABELS))
def test_box_exemplars_bad_labels_raise(labels):
    with pytest.raises(InvalidPromptError):
        box_exemplars([[0, 0, 10, 10], [5, 5, 20, 20]], labels, 40, 60)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("value", [1e39, 1e308, -1e39])
def test_box_exemplars_float32_overflow_raises(value):
    boxes = [[0, 0, value, 10]] if value > 0 else [[value, 0, 10, 10]]
    with pytest.raises(InvalidPromptError):
        box_exemplars(boxes, [1], 40, 60)


def test_box_exemplars_huge_int_raises_invalid_prompt():
    with pytest.raises(InvalidPromptError):
        box_exemplars([[0, 0, 10, 2**1100]], [1], 40, 60)


# --- scale_points --------------------------------------------------------------------------------

POINT_CASES = [  # fractions of the image size, as BOX_CASES
    ([[10 / 60, 20 / 40]], [1]),
    ([[0, 0], [59.5 / 60, 39.25 / 40], [30.125 / 60, 7.0 / 40]], [1, 0, 1]),
    ([[-0.2, 1.8], [1.9, -0.5]], [0, 0]),  # outside the image, within one image size: kept
    ([[1 / 3, 2 / 3]], [1]),
]


# The reference is the processor as users call it for the model, with return_tensors="pt": its scale
# factor is then `size / tensor(W)` in float32, which on some widths is one ulp off the correctly rounded
# Python float (112/60, say). scale_points must follow the reference, not the nicer rounding.
@pytest.mark.parametrize("height,width", IMAGE_SIZES + [(40, 60), (60, 40), (480, 640), (7, 3)])
@pytest.mark.parametrize("points,labels", POINT_CASES)
def test_scale_points_match_tracker_processor(tracker_processor, height, width, points, labels):
    points = in_pixels(points, height, width)
    scaled, out_labels = scale_points(points, labels, height, width, MODEL_SIZE)
    expected = tracker_processor(
        images=_image(height, width), input_points=[[points]], input_labels=[[labels]], return_tensors="pt"
    )
    assert scaled.dtype == np.float32 and scaled.shape == (len(points), 2)
    assert out_labels.dtype == np.int64 and out_labels.shape == (len(points),)
    assert torch.equal(torch.from_numpy(scaled), torch.as_tensor(np.asarray(expected["input_points"])[0, 0]))
    assert torch.equal(torch.from_numpy(out_labels), torch.as_tensor(np.asarray(expected["input_labels"])[0, 0]))


def test_scale_points_values():
    scaled, _ = scale_points([[60, 40], [30, 20]], [1, 1], 40, 60, MODEL_SIZE)
    np.testing.assert_allclose(scaled, [[112, 112], [56, 56]], rtol=1e-6)


BAD_POINTS = {
    "nan": [[float("nan"), 1]],
    "inf": [[1, float("inf")]],
    "flat": [1, 2],
    "one_coord": [[1]],
    "three_coords": [[1, 2, 3]],
    "empty": [],
    "empty_row": [[]],
    "ragged": [[1, 2], [1]],
    "three_d": [[[1, 2]]],
    "non_numeric_strings": [["x", "y"]],
    "none_inside": [[None, 1]],
    "string": "1,2",
    "scalar": 3.0,
}


@pytest.mark.parametrize("points", list(BAD_POINTS.values()), ids=list(BAD_POINTS))
def test_scale_points_bad_points_raise(points):
    with pytest.raises(InvalidPromptError):
        scale_points(points, [1], 40, 60, MODEL_SIZE)


@pytest.mark.parametrize("labels", [[1, 1], [], [2], [-1], [0.5], ["1"], [None], 1, [[1]]])
def test_scale_points_bad_labels_raise(labels):
    with pytest.raises(InvalidPromptError):
        scale_points([[1, 2]], labels, 40, 60, MODEL_SIZE)


# --- pad_box_exemplars ---------------------------------------------------------------------------


def test_pad_box_exemplars_matches_processor(tokenizer, processor):
    height, width = 40, 60
    b1, b2, b3 = [1, 2, 30, 20], [5, 5, 50, 39], [-5, 3, 70, 45]
    visual = tokenize(tokenizer, BOXES_ONLY_TEXT, MAX_TOKENS)
    prompts = [
        ConceptPrompt(visual, *box_exemplars([b1], [1], height, width)),
        ConceptPrompt(visual, *box_exemplars([b1, b2, b3], [1, 0, 1], height, width)),
    ]
    boxes, labels = pad_box_exemplars(prompts)
    assert boxes.shape == (2, 3, 4) and boxes.dtype == torch.float32
    assert labels.shape == (2, 3) and labels.dtype == torch.int64
    assert torch.all(labels[0, 1:] == PAD_VALUE)

    image = _image(height, width)
    expected = processor(
        images=[image, image],
        input_boxes=[[b1], [b1, b2, b3]],
        input_boxes_labels=[[1], [1, 0, 1]],
        return_tensors="pt",
    )
    assert torch.equal(labels, expected["input_boxes_labels"])
    # Bit-exact, padding included: transformers pads xyxy with -10, then converts, giving [-10, -10, 0, 0].
    assert torch.equal(boxes, expected["input_boxes"])


def test_pad_box_exemplars_equal_counts_no_padding():
    visual = TokenizedText(np.zeros(MAX_TOKENS, np.int64), np.zeros(MAX_TOKENS, np.int64))
    first = ConceptPrompt(visual, *box_exemplars([[0, 0, 10, 10], [1, 1, 5, 5]], [1, 0], 20, 20))
    second = ConceptPrompt(visual, *box_exemplars([[2, 2, 4, 8], [3, 3, 9, 9]], [0, 1], 30, 10))
    boxes, labels = pad_box_exemplars([first, second])
    assert boxes.shape == (2, 2, 4) and labels.shape == (2, 2)
    assert torch.equal(boxes[0], torch.from_numpy(first.boxes_cxcywh))
    assert torch.equal(boxes[1], torch.from_numpy(second.boxes_cxcywh))
    assert labels.tolist() == [[1, 0], [0, 1]]
    assert not (labels == PAD_VALUE).any()


# --- build_prompt --------------------------------------------------------------------------------


def test_build_prompt_none_raises(tokenizer):
    with pytest.raises(InvalidPromptError, match="none"):
        _build(tokenizer)


@pytest.mark.parametrize(
    "kwargs,names",
    [
        ({"text": "cat", "points": [[1, 2]], "labels": [1]}, ["text", "points"]),
        ({"text": "cat", "boxes": [[0, 0, 5, 5]], "labels": [1]}, ["text", "boxes"]),
        ({"points": [[1, 2]], "boxes": [[0, 0, 5, 5]], "labels": [1]}, ["points", "boxes"]),
        ({"text": "cat", "points": [[1, 2]], "boxes": [[0, 0, 5, 5]], "labels": [1]}, ["text", "points", "boxes"]),
    ],
)
def test_build_prompt_several_types_raise(tokenizer, kwargs, names):
    with pytest.raises(InvalidPromptError) as info:
        _build(tokenizer, **kwargs)
    for name in names:
        assert name in info.value.message.split("got", 1)[1]


def test_build_prompt_text(tokenizer):
    prompt = _build(tokenizer, text="a photo of a cat")
    assert isinstance(prompt, ConceptPrompt)
    assert prompt.boxes_cxcywh is None and prompt.box_labels is None
    assert prompt.text.input_ids[: len(CAT_IDS)].tolist() == CAT_IDS


def test_build_prompt_text_with_labels_raises(tokenizer):
    with pytest.raises(InvalidPromptError, match="labels"):
        _build(tokenizer, text="cat", labels=[1])


@pytest.mark.parametrize("text", ["", "   "])
def test_build_prompt_empty_text_raises(tokenizer, text):
    with pytest.raises(InvalidPromptError):
        _build(tokenizer, text=text)


def test_build_prompt_too_long_text_raises(tokenizer):
    with pytest.raises(PromptTooLongError):
        _build(tokenizer, text="cat " * 31)


@pytest.mark.parametrize("kind,value", [("points", [[1, 2]]), ("boxes", [[0, 0, 5, 5]])])
def test_build_prompt_labels_required(tokenizer, kind, value):
    with pytest.raises(InvalidPromptError, match="labels"):
        _build(tokenizer, **{kind: value})


def test_build_prompt_boxes_tokenize_visual(tokenizer, processor):
    height, width = 40, 60
    boxes, labels = [[1, 2, 30, 20], [5, 5, 50, 39]], [1, 0]
    prompt = _build(tokenizer, height=height, width=width, boxes=boxes, labels=labels)
    assert isinstance(prompt, ConceptPrompt)
    expected = processor(
        images=_image(height, width), input_boxes=[boxes], input_boxes_labels=[labels], return_tensors="pt"
    )
    # `Sam3Processor` uses the text "visual" for a boxes-only prompt.
    np.testing.assert_array_equal(prompt.text.input_ids, expected["input_ids"][0].numpy())
    np.testing.assert_array_equal(prompt.text.attention_mask, expected["attention_mask"][0].numpy())
    np.testing.assert_array_equal(prompt.text.input_ids, tokenize(tokenizer, "visual", MAX_TOKENS).input_ids)
    assert torch.equal(torch.from_numpy(prompt.boxes_cxcywh), expected["input_boxes"][0])
    assert torch.equal(torch.from_numpy(prompt.box_labels), expected["input_boxes_labels"][0])


def test_build_prompt_points(tokenizer, tracker_processor):
    height, width = 40, 60
    points, labels = [[10, 20], [59, 39]], [1, 0]
    prompt = _build(tokenizer, height=height, width=width, points=points, labels=labels)
    assert isinstance(prompt, PointPrompt)
    assert prompt.points.dtype == np.float32 and prompt.labels.dtype == np.int64
    expected = tracker_processor(
        images=_image(height, width), input_points=[[points]], input_labels=[[labels]], return_tensors="pt"
    )
    np.testing.assert_array_equal(prompt.points, expected["input_points"][0, 0].numpy())
    np.testing.assert_array_equal(prompt.labels, expected["input_labels"][0, 0].numpy())
    np.testing.assert_allclose(prompt.points, [[10 * 112 / 60, 20 * 112 / 40], [59 * 112 / 60, 39 * 112 / 40]], rtol=1e-6)


@pytest.mark.parametrize("kind", ["points", "boxes"])
def test_build_prompt_bad_values_raise(tokenizer, kind):
    with pytest.raises(InvalidPromptError):
        _build(tokenizer, **{kind: [[float("nan"), 1, 2, 3][: 2 if kind == "points" else 4]]}, labels=[1])
    with pytest.raises(InvalidPromptError):
        _build(tokenizer, **{kind: [[1, 2, 3, 4][: 2 if kind == "points" else 4]]}, labels=[2])


# --- properties ----------------------------------------------------------------------------------


@st.composite
def _valid_boxes(draw):
    height = draw(st.integers(1, 4000))
    width = draw(st.integers(1, 4000))
    count = draw(st.integers(1, 8))
    boxes = []
    for _ in range(count):
        coords = []
        for size in (width, height):
            a = draw(st.floats(0, size, allow_nan=False, allow_infinity=False))
            b = draw(st.floats(0, size, allow_nan=False, allow_infinity=False))
            low, high = min(a, b), max(a, b)
            # At least a hundredth of a pixel apart, so the box keeps a positive float32 area.
            if high - low < 0.01:
                low, high = (low, low + 0.01) if low + 0.01 <= size else (high - 0.01, high)
            coords.append((low, high))
        (x0, x1), (y0, y1) = coords
        boxes.append([x0, y0, x1, y1])
    labels = draw(st.lists(st.integers(0, 1), min_size=count, max_size=count))
    return boxes, labels, height, width


@settings(max_examples=300, deadline=None)
@given(_valid_boxes())
def test_property_valid_boxes(case):
    boxes, labels, height, width = case
    cxcywh, out_labels = box_exemplars(boxes, labels, height, width)
    assert cxcywh.dtype == np.float32 and cxcywh.shape == (len(boxes), 4)
    assert out_labels.dtype == np.int64 and out_labels.tolist() == labels
    assert np.isfinite(cxcywh).all()
    cx, cy, w, h = cxcywh.T
    assert ((cx >= 0) & (cx <= 1) & (cy >= 0) & (cy <= 1)).all()
    assert ((w > 0) & (w <= 1) & (h > 0) & (h <= 1)).all()
    # Center minus/plus half the size stays within the image (up to float32 rounding).
    assert (cx - w / 2 >= -1e-6).all() and (cx + w / 2 <= 1 + 1e-6).all()
    assert (cy - h / 2 >= -1e-6).all() and (cy + h / 2 <= 1 + 1e-6).all()
    expected = [
        [(x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height]
        for x0, y0, x1, y1 in boxes
    ]
    np.testing.assert_allclose(cxcywh, expected, rtol=1e-4, atol=1e-5)


_garbage = st.recursive(
    st.none() | st.floats() | st.text(max_size=5) | st.booleans(),
    lambda children: st.lists(children, max_size=5),
    max_leaves=25,
)


# Huge finite floats overflow float32 (see test_box_exemplars_float32_overflow_raises).
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(boxes=_garbage, labels=_garbage | st.just([1]))
def test_property_garbage_boxes_only_invalid_prompt(boxes, labels):
    try:
        cxcywh, out_labels = box_exemplars(boxes, labels, 40, 60)
    except InvalidPromptError:
        return
    assert cxcywh.dtype == np.float32 and cxcywh.ndim == 2 and cxcywh.shape[1] == 4
    assert out_labels.dtype == np.int64 and out_labels.shape == (cxcywh.shape[0],)


# Huge finite floats overflow float32 (see test_box_exemplars_float32_overflow_raises).
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(points=_garbage, labels=_garbage | st.just([1]))
def test_property_garbage_points_only_invalid_prompt(points, labels):
    try:
        scaled, out_labels = scale_points(points, labels, 40, 60, MODEL_SIZE)
    except InvalidPromptError:
        return
    assert scaled.dtype == np.float32 and scaled.ndim == 2 and scaled.shape[1] == 2
    assert out_labels.dtype == np.int64 and out_labels.shape == (scaled.shape[0],)


# --- several prompts in one request ----------------------------------------------------------------


def _build_all(tokenizer, **kwargs):
    prompt = {"text": None, "points": None, "boxes": None, "labels": None}
    prompt.update(kwargs)
    return build_prompts(
        **prompt, tokenizer=tokenizer, text_max_tokens=MAX_TOKENS, model_size=MODEL_SIZE, height=40, width=60
    )


def test_several_texts_and_box_sets_give_one_prompt_each_in_order(tokenizer):
    texts = _build_all(tokenizer, text=["a photo of a cat", "dog"])
    assert [type(prompt) for prompt in texts] == [ConceptPrompt, ConceptPrompt]
    np.testing.assert_array_equal(texts[0].text.input_ids[: len(CAT_IDS)], CAT_IDS)
    np.testing.assert_array_equal(texts[1].text.input_ids, _build(tokenizer, text="dog").text.input_ids)
    sets = [([[0, 0, 10, 10]], [1]), {"boxes": [[5, 5, 30, 20], [1, 1, 4, 4]], "labels": [1, 0]}]
    boxes = _build_all(tokenizer, box_sets=sets)
    assert [prompt.boxes_cxcywh.shape[0] for prompt in boxes] == [1, 2]
    alone = _build(tokenizer, boxes=[[5, 5, 30, 20], [1, 1, 4, 4]], labels=[1, 0])
    np.testing.assert_array_equal(boxes[1].boxes_cxcywh, alone.boxes_cxcywh)
    np.testing.assert_array_equal(boxes[1].box_labels, alone.box_labels)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"text": []}, "text must be a non-empty string or a non-empty list"),
        ({"text": ["cat", " "]}, "non-empty string"),
        ({"text": ["cat", "dog", "cow"], "max_items": 2}, "3 text entries given; at most 2"),
        ({"box_sets": []}, "box_sets must be a non-empty list"),
        ({"box_sets": [([[0, 0, 1, 1]], None)]}, "labels are required with boxes"),
        ({"box_sets": [[[0, 0, 1, 1]]]}, "each box set must be"),
        ({"box_sets": [([[0, 0, 1, 1]], [1])], "labels": [1]}, "labels go with points or boxes"),
        ({"box_sets": [([[0, 0, 1, 1]], [1])] * 3, "max_items": 2}, "3 box_sets entries given; at most 2"),
        ({"text": "cat", "box_sets": [([[0, 0, 1, 1]], [1])]}, "exactly one prompt type"),
    ],
)
def test_bad_prompt_lists_raise_invalid_prompt(tokenizer, kwargs, message):
    with pytest.raises(InvalidPromptError, match=message):
        _build_all(tokenizer, **kwargs)
