"""Unit tests for sam3_serve_core.images.decode_image (numpy + Pillow only; no Ray, no model)."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from client.errors import ImageTooLargeError, InvalidImageError
from sam3_serve_core.images import decode_image

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def _encode(image: Image.Image, fmt: str = "PNG", **save_kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_kwargs)
    return buffer.getvalue()


def _assert_rgb(out: np.ndarray, height: int, width: int) -> None:
    assert isinstance(out, np.ndarray)
    assert out.dtype == np.uint8
    assert out.shape == (height, width, 3)
    assert out.flags.c_contiguous


@pytest.fixture
def rgb() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)


# --- input kinds -------------------------------------------------------------------------------


def test_png_path_as_str_and_path(tmp_path: Path, rgb: np.ndarray) -> None:
    path = tmp_path / "image.png"
    Image.fromarray(rgb).save(path)
    for source in (str(path), path):
        out = decode_image(source)
        _assert_rgb(out, 5, 7)
        np.testing.assert_array_equal(out, rgb)


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
def test_encoded_bytes_like(rgb: np.ndarray, wrap) -> None:
    out = decode_image(wrap(_encode(Image.fromarray(rgb))))
    _assert_rgb(out, 5, 7)
    np.testing.assert_array_equal(out, rgb)


def test_jpeg_bytes_decode_close_to_original() -> None:
    flat = np.full((16, 16, 3), (200, 100, 50), dtype=np.uint8)
    out = decode_image(_encode(Image.fromarray(flat), "JPEG", quality=95))
    _assert_rgb(out, 16, 16)
    assert np.abs(out.astype(int) - flat).max() <= 3


def test_pil_image(rgb: np.ndarray) -> None:
    out = decode_image(Image.fromarray(rgb))
    _assert_rgb(out, 5, 7)
    np.testing.assert_array_equal(out, rgb)


def test_lazy_pil_image_from_file(tmp_path: Path, rgb: np.ndarray) -> None:
    path = tmp_path / "image.png"
    Image.fromarray(rgb).save(path)
    with Image.open(path) as image:
        np.testing.assert_array_equal(decode_image(image), rgb)


def test_numpy_rgb_is_copied(rgb: np.ndarray) -> None:
    out = decode_image(rgb)
    _assert_rgb(out, 5, 7)
    np.testing.assert_array_equal(out, rgb)
    assert not np.shares_memory(out, rgb)


def test_non_contiguous_numpy_becomes_contiguous(rgb: np.ndarray) -> None:
    view = rgb[:, ::-1]
    out = decode_image(view)
    _assert_rgb(out, 5, 7)
    np.testing.assert_array_equal(out, view)


# --- PIL modes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["L", "1", "P", "CMYK", "YCbCr", "RGBX"])
def test_opaque_modes_match_pil_convert(mode: str, rgb: np.ndarray) -> None:
    image = Image.fromarray(rgb).convert(mode)
    out = decode_image(image)
    _assert_rgb(out, 5, 7)
    np.testing.assert_array_equal(out, np.array(image.convert("RGB")))


@pytest.mark.parametrize("mode", ["L", "1", "P"])
def test_opaque_modes_through_png_bytes(mode: str, rgb: np.ndarray) -> None:
    image = Image.fromarray(rgb).convert(mode)
    out = decode_image(_encode(image))
    np.testing.assert_array_equal(out, np.array(image.convert("RGB")))


def test_cmyk_jpeg_bytes(rgb: np.ndarray) -> None:
    image = Image.fromarray(rgb).convert("CMYK")
    _assert_rgb(decode_image(_encode(image, "JPEG")), 5, 7)


def test_rgba_is_composited_onto_white() -> None:
    rgba = np.array(
        [[[255, 0, 0, 255], [0, 255, 0, 0], [0, 0, 255, 128], [10, 20, 30, 255]]], dtype=np.uint8
    )
    out = decode_image(_encode(Image.fromarray(rgba)))
    _assert_rgb(out, 1, 4)
    assert tuple(out[0, 0]) == RED  # opaque: unchanged
    assert tuple(out[0, 1]) == WHITE  # fully transparent: white, whatever the hidden colour
    assert abs(int(out[0, 2, 0]) - 127) <= 1 and out[0, 2, 2] == 255  # half blue over white
    assert tuple(out[0, 3]) == (10, 20, 30)


def test_la_and_palette_transparency_are_composited_onto_white() -> None:
    la = Image.fromarray(np.array([[[40, 255], [40, 0]]], dtype=np.uint8), "LA")
    np.testing.assert_array_equal(decode_image(_encode(la)), [[[40, 40, 40], WHITE]])
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255])
    palette.putpixel((1, 0), 1)
    out = decode_image(_encode(palette, transparency=1))
    np.testing.assert_array_equal(out, [[RED, WHITE]])


def _transformers_convert_to_rgb():
    image_transforms = pytest.importorskip("transformers.image_transforms")
    return image_transforms.convert_to_rgb


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA", "P", "L", "1", "CMYK", "RGB"])
def test_pil_modes_match_transformers_convert_to_rgb(mode: str) -> None:
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, size=(6, 4, 4), dtype=np.uint8)
    image = Image.fromarray(rgba).convert(mode)
    expected = _transformers_convert_to_rgb()(image, return_numpy=True)
    np.testing.assert_array_equal(decode_image(image), expected)


def test_16_bit_png_keeps_high_byte() -> None:
    samples = np.array([[0, 255, 256, 32768, 65535]], dtype=np.uint16)
    data = _encode(Image.fromarray(samples))
    assert Image.open(io.BytesIO(data)).mode in {"I;16", "I"}
    out = decode_image(data)
    _assert_rgb(out, 1, 5)
    np.testing.assert_array_equal(out[..., 0], [[0, 0, 1, 128, 255]])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_16_bit_big_endian_pil_mode() -> None:
    samples = np.array([[256, 65535]], dtype=">u2")
    image = Image.frombytes("I;16B", (2, 1), samples.tobytes())
    np.testing.assert_array_equal(decode_image(image)[..., 1], [[1, 255]])


def test_32_bit_int_mode_is_clipped_to_16_bits() -> None:
    image = Image.fromarray(np.array([[-5, 512, 65535, 70000]], dtype=np.int32), "I")
    out = decode_image(image)
    np.testing.assert_array_equal(out[..., 0], [[0, 2, 255, 255]])


def test_float_mode_is_rounded_and_clipped() -> None:
    values = np.array([[-3.0, 0.4, 1.6, 127.4, 300.0, np.nan]], dtype=np.float32)
    out = decode_image(Image.fromarray(values, "F"))
    _assert_rgb(out, 1, 6)
    np.testing.assert_array_equal(out[..., 0], [[0, 0, 2, 127, 255, 0]])


# --- numpy layouts and dtypes ------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 4), (3, 4, 1)])
def test_numpy_grayscale_is_repeated(shape: tuple[int, ...]) -> None:
    gray = np.arange(12, dtype=np.uint8).reshape(shape)
    out = decode_image(gray)
    _assert_rgb(out, 3, 4)
    for channel in range(3):
        np.testing.assert_array_equal(out[..., channel], gray.reshape(3, 4))


def test_numpy_rgba_is_composited_like_png(rgb: np.ndarray) -> None:
    alpha = np.random.default_rng(2).integers(0, 256, size=(5, 7, 1), dtype=np.uint8)
    rgba = np.concatenate([rgb, alpha], axis=2)
    out = decode_image(rgba)
    _assert_rgb(out, 5, 7)
    np.testing.assert_array_equal(out, decode_image(_encode(Image.fromarray(rgba))))
    opaque = np.concatenate([rgb, np.full_like(alpha, 255)], axis=2)
    np.testing.assert_array_equal(decode_image(opaque), rgb)


def test_numpy_bool() -> None:
    out = decode_image(np.array([[True, False]]))
    np.testing.assert_array_equal(out, [[WHITE, (0, 0, 0)]])


def test_numpy_uint16_keeps_high_byte() -> None:
    out = decode_image(np.array([[0, 256, 65535]], dtype=np.uint16))
    np.testing.assert_array_equal(out[..., 0], [[0, 1, 255]])


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_numpy_float_in_unit_range(dtype) -> None:
    out = decode_image(np.array([[0.0, 0.5, 1.0, 0.2]], dtype=dtype))
    np.testing.assert_array_equal(out[..., 0], [[0, 128, 255, 51]])


@pytest.mark.parametrize("values", [[[0.0, 1.5]], [[-0.1, 0.5]], [[0.5, np.nan]], [[0.0, 255.0]]])
def test_numpy_float_out_of_range(values) -> None:
    with pytest.raises(InvalidImageError, match=r"\[0, 1\]"):
        decode_image(np.array(values, dtype=np.float32))


@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.int64, np.uint32, np.complex64, object])
def test_numpy_unsupported_dtype(dtype) -> None:
    with pytest.raises(InvalidImageError, match="dtype"):
        decode_image(np.zeros((2, 2, 3), dtype=dtype))


@pytest.mark.parametrize("shape", [(5,), (2, 2, 2), (2, 2, 5), (2, 2, 3, 1), (3, 2, 2, 2)])
def test_numpy_unsupported_shape(shape: tuple[int, ...]) -> None:
    with pytest.raises(InvalidImageError, match="shape"):
        decode_image(np.zeros(shape, dtype=np.uint8))


# --- EXIF orientation --------------------------------------------------------------------------


def _corner_image(block: int) -> Image.Image:
    """A 2-by-1 grid of ``block``-pixel cells: wide, with a distinct colour in every corner."""
    quadrants = np.zeros((2 * block, 4 * block, 3), dtype=np.uint8)
    quadrants[:block, : 2 * block] = RED  # top-left
    quadrants[:block, 2 * block :] = GREEN  # top-right
    quadrants[block:, : 2 * block] = BLUE  # bottom-left
    quadrants[block:, 2 * block :] = WHITE  # bottom-right
    return Image.fromarray(quadrants)


def _rotated_exif() -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the stored pixels must be turned 90 degrees clockwise
    return exif


def _assert_turned_clockwise(out: np.ndarray, block: int, tolerance: int) -> None:
    _assert_rgb(out, 4 * block, 2 * block)  # height and width swapped
    corners = {(0, 0): BLUE, (0, -1): RED, (-1, -1): GREEN, (-1, 0): WHITE}
    for (row, col), colour in corners.items():
        assert np.abs(out[row, col].astype(int) - colour).max() <= tolerance, (row, col)


@pytest.mark.parametrize(("fmt", "tolerance"), [("PNG", 0), ("JPEG", 40)])
def test_exif_orientation_is_applied_to_bytes(fmt: str, tolerance: int) -> None:
    data = _encode(_corner_image(8), fmt, exif=_rotated_exif())
    _assert_turned_clockwise(decode_image(data), 8, tolerance)


def test_exif_orientation_is_applied_to_pil_without_modifying_it(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    _corner_image(8).save(path, exif=_rotated_exif())
    _assert_turned_clockwise(decode_image(path), 8, 40)
    with Image.open(path) as image:
        _assert_turned_clockwise(decode_image(image), 8, 40)
        assert image.size == (32, 16)
        assert image.getexif()[0x0112] == 6


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"not an image at all", np.random.default_rng(3).bytes(512)])
def test_undecodable_bytes(data: bytes) -> None:
    with pytest.raises(InvalidImageError):
        decode_image(data)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file(fmt: str, rgb: np.ndarray) -> None:
    noisy = np.random.default_rng(4).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    data = _encode(Image.fromarray(noisy), fmt)
    with pytest.raises(InvalidImageError, match="truncated"):
        decode_image(data[: len(data) // 2])


def test_truncated_path(tmp_path: Path) -> None:
    noisy = np.random.default_rng(5).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    data = _encode(Image.fromarray(noisy))
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidImageError):
        decode_image(path)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(InvalidImageError, match="no such file"):
        decode_image(tmp_path / "missing.png")
    with pytest.raises(InvalidImageError, match="no such file"):
        decode_image(str(tmp_path / "missing.png"))


def test_directory_path(tmp_path: Path) -> None:
    with pytest.raises(InvalidImageError):
        decode_image(tmp_path)


@pytest.mark.parametrize("source", [42, None, 1.5, [[0, 0, 0]], {"image": b""}])
def test_unsupported_source_type(source) -> None:
    with pytest.raises(InvalidImageError, match=type(source).__name__):
        decode_image(source)


@pytest.mark.parametrize("shape", [(0, 5, 3), (5, 0, 3), (0, 0), (5, 0)])
def test_zero_size_numpy(shape: tuple[int, ...]) -> None:
    with pytest.raises(InvalidImageError, match="empty"):
        decode_image(np.zeros(shape, dtype=np.uint8))


def test_zero_size_pil() -> None:
    with pytest.raises(InvalidImageError, match="empty"):
        decode_image(Image.new("RGB", (0, 3)))


def test_max_pixels_is_checked_before_decoding() -> None:
    data = _encode(Image.new("RGB", (100, 50)))
    header_only = data[: data.index(b"IDAT") + 4]  # the size is known, no pixel data follows
    with pytest.raises(ImageTooLargeError, match="5000 pixels"):
        decode_image(header_only, max_pixels=4999)
    with pytest.raises(InvalidImageError):
        decode_image(header_only)
    _assert_rgb(decode_image(data, max_pixels=5000), 50, 100)


def test_max_pixels_for_pil_and_numpy() -> None:
    with pytest.raises(ImageTooLargeError):
        decode_image(Image.new("RGB", (10, 10)), max_pixels=99)
    with pytest.raises(ImageTooLargeError):
        decode_image(np.zeros((10, 10, 3), dtype=np.uint8), max_pixels=99)
    _assert_rgb(decode_image(np.zeros((10, 10), dtype=np.uint8), max_pixels=100), 10, 10)


def test_image_too_large_is_an_invalid_request_not_an_invalid_image() -> None:
    with pytest.raises(ImageTooLargeError) as info:
        decode_image(np.zeros((2, 2, 3), dtype=np.uint8), max_pixels=3)
    assert not isinstance(info.value, InvalidImageError)
    assert info.value.http_status == 413


@pytest.mark.parametrize("size", [(15, 10), (30, 30)])  # over 1x (warning) and 2x (error) the limit
def test_decompression_bomb_guard(monkeypatch: pytest.MonkeyPatch, size: tuple[int, int]) -> None:
    data = _encode(Image.new("RGB", size))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    filters_before = list(warnings.filters)
    with pytest.raises(ImageTooLargeError):
        decode_image(data)
    assert warnings.filters == filters_before


# --- property ----------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(
    arrays(
        np.uint8,
        st.tuples(st.integers(1, 16), st.integers(1, 16), st.just(3)),
    )
)
def test_png_round_trip(pixels: np.ndarray) -> None:
    out = decode_image(_encode(Image.fromarray(pixels)))
    _assert_rgb(out, pixels.shape[0], pixels.shape[1])
    np.testing.assert_array_equal(out, pixels)


# --- raw pixels as .npy (what the clients send for numpy arrays) ------------------------------------


def _npy(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 3), (5, 7, 4)])
def test_npy_pixels_decode_like_the_array_itself(shape):
    pixels = np.random.default_rng(3).integers(0, 256, size=shape, dtype=np.uint8)
    decoded = decode_image(_npy(pixels))
    np.testing.assert_array_equal(decoded, decode_image(pixels))
    assert decoded.flags.writeable and decoded.flags.c_contiguous


def test_npy_bool_pixels_become_0_and_255():
    np.testing.assert_array_equal(decode_image(_npy(np.eye(3, dtype=bool)))[..., 0], np.eye(3) * 255)


@pytest.mark.parametrize(
    "data, message",
    [
        (_npy(np.zeros((4, 4, 3), np.uint8))[:-1], "holds 47 bytes of pixels"),
        (_npy(np.zeros((4, 4, 3), np.uint8))[:20], "invalid .npy image"),
        (_npy(np.zeros((4, 4, 3), np.float32)), "uint8 or bool"),
        (_npy(np.array([{"a": 1}], dtype=object), allow_pickle=True), "uint8 or bool"),
        (_npy(np.asfortranarray(np.zeros((4, 5, 3), np.uint8))), "fortran_order=True"),
        (_npy(np.zeros((4, 4, 2), np.uint8)), "unsupported .npy image shape"),
        (_npy(np.zeros((2, 2, 2, 3), np.uint8)), "unsupported .npy image shape"),
    ],
)
def test_bad_npy_images_are_invalid_images(data, message):
    with pytest.raises(InvalidImageError, match=message):
        decode_image(data)


def test_npy_pixel_limit_is_checked_from_the_header_before_reading_pixels():
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "|u1", "fortran_order": False, "shape": (20000, 20000)})
    header_only = buffer.getvalue()  # magic and header; the 400 MB of pixels are not even there
    with pytest.raises(ImageTooLargeError, match="400000000 pixels"):
        decode_image(header_only, max_pixels=1000)
