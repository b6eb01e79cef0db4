"""Masks on the wire: COCO compressed RLE through pycocotools, decoded to uint8 0/255 arrays."""

from __future__ import annotations

import numpy as np
from pycocotools import mask as coco_mask

from client.protocol import RleMask


def encode_mask(mask: np.ndarray) -> RleMask:
    """A (H, W) mask (nonzero = foreground) to compressed RLE."""
    rle = coco_mask.encode(np.asfortranarray(mask != 0, dtype=np.uint8))
    return RleMask(size=(int(rle["size"][0]), int(rle["size"][1])), counts=rle["counts"].decode("ascii"))


def decode_mask(rle: RleMask) -> np.ndarray:
    """Compressed RLE to a C-contiguous (H, W) uint8 mask of 0 and 255."""
    binary = coco_mask.decode({"size": list(rle.size), "counts": rle.counts.encode("ascii")})
    return np.ascontiguousarray(binary, dtype=np.uint8) * np.uint8(255)
