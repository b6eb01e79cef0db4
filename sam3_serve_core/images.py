"""Turn whatever a caller sends as an image into one canonical RGB uint8 array.

Every entry point (HTTP upload, handle call, benchmark) goes through :func:`decode_image`, so the
model always sees the same pixels for the same photo, and every malformed input fails with the
project's typed errors instead of a raw PIL or numpy exception. Only numpy and Pillow are used so
this module can be imported and tested without Ray or torch.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from client.errors import ImageTooLargeError, InvalidImageError

ImageSource = Union[str, Path, bytes, bytearray, memoryview, Image.Image, np.ndarray]

# Modes whose samples are wider than 8 bits: PIL's convert("RGB") clips them instead of scaling.
_HIGH_DEPTH_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_ARRAY_CHANNELS = (1, 3, 4)
# Raw pixels as numpy's .npy format: what the clients send for numpy arrays.
_NPY_MAGIC = b"\x93NUMPY"
_NPY_DTYPES = frozenset({np.dtype(np.uint8), np.dtype(np.bool_)})


def decode_image(source: ImageSource, *, max_pixels: int | None = None) -> np.ndarray:
    """Decode ``source`` into a C-contiguous ``uint8`` array of shape (H, W, 3), RGB.

    ``source`` is a file path (``str`` or ``Path``; a ``str`` is never treated as image data),
    encoded file bytes, a ``PIL.Image.Image`` or a ``numpy.ndarray``. Files and PIL images are
    turned upright with their EXIF Orientation tag, so masks computed on the result are in the
    orientation viewers show the photo in, not in the raw sensor orientation. Transparency is
    composited onto white, as transformers' image processors do. The result never shares memory
    with ``source``.

    Raises ``ImageTooLargeError`` when the image has more than ``max_pixels`` pixels (checked
    before any pixel data is decoded) or trips Pillow's decompression-bomb guard, and
    ``InvalidImageError`` for anything that cannot be decoded into an RGB image.
    """
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source, max_pixels)
    if isinstance(source, Image.Image):
        return _pil_to_rgb_array(source, max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)) and bytes(source[: len(_NPY_MAGIC)]) == _NPY_MAGIC:
        return _array_to_rgb(_npy_array(source, max_pixels), max_pixels)
    with _open_encoded(source) as image:
        return _pil_to_rgb_array(image, max_pixels)


@contextlib.contextmanager
def _pil_errors() -> Iterator[None]:
    """Map whatever Pillow raises on broken or hostile input to the project's typed errors.

    Pillow's format plugins raise many exception types on malformed files (OSError, SyntaxError,
    ValueError, EOFError, struct.error, IndexError, ...), so all of them become
    ``InvalidImageError`` with the original chained. Decompression-bomb warnings are made errors
    only inside this block; Pillow's global settings are left alone.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            yield
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageTooLargeError(f"image is too large to decode safely: {exc}") from exc
        except FileNotFoundError as exc:
            raise InvalidImageError(f"no such file: {exc.filename}") from exc
        except UnidentifiedImageError as exc:
            raise InvalidImageError("not an image file in a format Pillow can read") from exc
        except MemoryError:
            raise
        except Exception as exc:
            raise InvalidImageError(f"cannot decode image: {type(exc).__name__}: {exc}") from exc


@contextlib.contextmanager
def _open_encoded(source: object) -> Iterator[Image.Image]:
    """Open a path or encoded bytes lazily, so the size can be checked before pixels are decoded.

    The file handle is closed when the block ends, also for multi-frame formats.
    """
    if isinstance(source, (str, Path)):
        file: str | Path | io.BytesIO = source
    elif isinstance(source, (bytes, bytearray, memoryview)):
        file = io.BytesIO(bytes(source))
    else:
        raise InvalidImageError(
            f"unsupported image source type {type(source).__name__}: expected a path (str or "
            "Path), encoded bytes, a PIL image or a numpy array"
        )
    with _pil_errors():
        image = Image.open(file)
    with image:
        yield image


def _npy_array(data: bytes | bytearray | memoryview, max_pixels: int | None) -> np.ndarray:
    """A read-only view of the pixels of a .npy file, its header checked before anything is allocated.

    Only uint8 and bool arrays of an image's shape are accepted; pickled objects never are.
    """
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(stream)
    except (ValueError, SyntaxError, TypeError) as error:
        raise InvalidImageError(f"invalid .npy image: {error}") from error
    if dtype not in _NPY_DTYPES or fortran_order:
        raise InvalidImageError(f".npy images must be C-ordered uint8 or bool, got {dtype} (fortran_order={fortran_order})")
    if len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] not in _ARRAY_CHANNELS):
        raise InvalidImageError(f"unsupported .npy image shape {shape}: expected (H, W), (H, W, 3) or (H, W, 4)")
    _check_size(shape[1], shape[0], max_pixels)
    count = int(np.prod(shape))
    offset = stream.tell()
    if len(data) - offset != count * dtype.itemsize:
        raise InvalidImageError(f".npy image holds {len(data) - offset} bytes of pixels; its shape {shape} needs {count}")
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)


def _check_size(width: int, height: int, max_pixels: int | None) -> None:
    """Reject empty images and, cheaply and before decoding, images over the pixel budget."""
    if width == 0 or height == 0:
        raise InvalidImageError(f"image is empty ({width}x{height} pixels)")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(
            f"image has {width * height} pixels ({width}x{height}); at most {max_pixels} are accepted"
        )


def _pil_to_rgb_array(image: Image.Image, max_pixels: int | None) -> np.ndarray:
    """Decode an opened (possibly still lazy) PIL image, upright, into an RGB uint8 array."""
    _check_size(image.width, image.height, max_pixels)
    with _pil_errors():
        image.load()  # decodes now, so truncated data raises here (LOAD_TRUNCATED_IMAGES stays off)
        image = ImageOps.exif_transpose(image)  # a copy: a caller's PIL image is never modified
        if image.mode not in _HIGH_DEPTH_MODES:
            return np.array(_flatten_to_rgb(image))
        samples = np.array(image)
    return np.repeat(_high_depth_to_uint8(samples, image.mode)[..., np.newaxis], 3, axis=2)


def _flatten_to_rgb(image: Image.Image) -> Image.Image:
    """Convert to RGB exactly as transformers' ``convert_to_rgb`` does, for pixel parity with it.

    Images with an alpha band or a transparency key are composited onto white; every other mode
    goes through Pillow's own ``convert("RGB")``.
    """
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _high_depth_to_uint8(samples: np.ndarray, mode: str) -> np.ndarray:
    """Scale single-band samples wider than 8 bits down to 0..255.

    Float ("F") samples are taken as 0..255 values: rounded, clipped, NaN becomes 0. Integer
    samples are 16-bit data (mode "I" is clipped to 0..65535 first, as PNG and TIFF only put
    16-bit data there) and keep their high byte, i.e. floor(v / 256): 65535 -> 255, 256 -> 1.
    That is the same truncation Pillow applies to 16-bit RGB files, and it is at most 1 off
    round(v / 257).
    """
    if mode == "F":
        return np.rint(np.clip(np.nan_to_num(samples, nan=0.0), 0, 255)).astype(np.uint8)
    return (np.clip(samples, 0, 65535).astype(np.uint16) >> 8).astype(np.uint8)


def _array_to_rgb(array: np.ndarray, max_pixels: int | None) -> np.ndarray:
    """Validate a caller's array layout and value range and turn it into an RGB uint8 array."""
    if array.ndim == 2:
        array = array[..., np.newaxis]
    if array.ndim != 3 or array.shape[2] not in _ARRAY_CHANNELS:
        raise InvalidImageError(
            f"unsupported image array shape {array.shape}: expected (H, W), (H, W, 1), "
            "(H, W, 3) or (H, W, 4)"
        )
    height, width, channels = array.shape
    _check_size(width, height, max_pixels)
    pixels = _array_to_uint8(array)
    if channels == 1:
        return np.repeat(pixels, 3, axis=2)
    if channels == 4:
        return np.array(_flatten_to_rgb(Image.fromarray(np.ascontiguousarray(pixels))))
    return np.array(pixels, order="C")  # always a copy: the caller may reuse its buffer


def _array_to_uint8(array: np.ndarray) -> np.ndarray:
    """Bring the accepted dtypes to 0..255 uint8 with the conventions documented in the errors."""
    kind, itemsize = array.dtype.kind, array.dtype.itemsize
    if kind == "u" and itemsize == 1:
        return array
    if kind == "b":
        return array.astype(np.uint8) * np.uint8(255)
    if kind == "u" and itemsize == 2:
        return (array >> 8).astype(np.uint8)
    if kind == "f":
        low, high = array.min(), array.max()
        if not (low >= 0 and high <= 1):  # also rejects NaN
            raise InvalidImageError(
                f"float image arrays must hold values in [0, 1], got values in [{low}, {high}]"
            )
        return np.rint(array * 255).astype(np.uint8)
    raise InvalidImageError(
        f"unsupported image array dtype {array.dtype}: expected uint8 (0..255), uint16 "
        "(0..65535), bool, or float with values in [0, 1]"
    )
