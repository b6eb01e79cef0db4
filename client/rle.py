"""Masks on the wire: COCO compressed RLE through pycocotools, decoded to uint8 0/255 arrays."""

from __future__ import annotations

import numpy as np
from pycocotools import mask as coco_mask

from client.protocol import RleMask


def encode_mask(mask: np.ndarray) -> RleMask:
    """A (H, W) mask (nonzero = foreground) to compressed RLE."""
    (rle,) = encode_masks(mask[np.newaxis])
    return rle


def encode_masks(masks: np.ndarray) -> list[RleMask]:
    """(K, H, W) masks to K compressed RLEs in one pycocotools call (it wants them as Fortran (H, W, K))."""
    binary = masks if masks.dtype == np.bool_ else masks != 0
    return encode_stacked(binary.transpose(1, 2, 0))


def encode_stacked(stacked: np.ndarray) -> list[RleMask]:
    """(H, W, K) 0/1 masks to K compressed RLEs; Fortran-ordered uint8 input is encoded without a copy."""
    return [
        RleMask(size=(int(rle["size"][0]), int(rle["size"][1])), counts=rle["counts"].decode("ascii"))
        for rle in coco_mask.encode(np.asfortranarray(stacked, dtype=np.uint8))
    ]


def decode_mask(rle: RleMask) -> np.ndarray:
    """Compressed RLE to a C-contiguous (H, W) uint8 mask of 0 and 255."""
    binary = coco_mask.decode({"size": list(rle.size), "counts": rle.counts.encode("ascii")})
    return np.ascontiguousarray(binary, dtype=np.uint8) * np.uint8(255)
