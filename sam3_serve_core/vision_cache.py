"""Vision features kept across requests, so a follow-up prompt on the same image skips the ViT.

Interactive use sends one image many times (a click, a negative click, a concept, a box), and the ViT is
over 90% of the real model's cost per image while the heads that read its features are small. An image is
named by a content hash of its model-ready pixels, its original size and the checkpoint (`image_key`),
computed on the CPU preprocessor; the model replica keeps each image's backbone output under that name,
least recently used evicted past a byte budget.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from client.errors import InvalidRequestError
from client.protocol import IMAGE_ID_PATTERN

_IMAGE_ID = re.compile(IMAGE_ID_PATTERN)


def image_key(pixels: np.ndarray, original_size: tuple[int, int], checkpoint: str) -> str:
    """The image's id: a hash of what the model sees, then the original size that prompts are scaled against.

    The same photo sent as a JPEG or as a numpy array has the same pixels, so the same id.
    """
    digest = hashlib.blake2b(np.ascontiguousarray(pixels).data, digest_size=16)
    digest.update(checkpoint.encode())
    height, width = original_size
    digest.update(f"{height}x{width}".encode())
    return f"{digest.hexdigest()}-{height}x{width}"


def original_size_of(image_id: str) -> tuple[int, int]:
    """(height, width) from an image id; the wire model checks the id's shape, this checks it again for
    callers that build requests in process."""
    if not _IMAGE_ID.match(image_id):
        raise InvalidRequestError(f"not an image id: {image_id!r}")
    height, width = image_id.rsplit("-", 1)[1].split("x")
    return int(height), int(width)


@dataclass(frozen=True)
class ImageFeatures:
    """One image's backbone output, as `get_vision_features` returns it for a batch of one.

    The FPN position encodings are left out: they depend only on the shapes, so the runner keeps one copy.
    """

    fpn_hidden_states: tuple[torch.Tensor, ...]  # each [1, C, h, w]
    last_hidden_state: torch.Tensor  # [1, tokens, hidden], what the tracker's own neck reads

    @property
    def nbytes(self) -> int:
        tensors = (*self.fpn_hidden_states, self.last_hidden_state)
        return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    evictions: int
    bytes_held: int
    images_held: int


class VisionFeatureCache:
    """Least recently used, bounded by bytes (on the model's device: GPU memory on a GPU).

    An entry larger than the whole budget is not kept. Thread-safe: batches may run on several threads.
    A caller holds the tensors it took, so an eviction never frees features a running batch still reads.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, ImageFeatures] = OrderedDict()
        self._bytes = 0
        self._hits = self._misses = self._evictions = 0
        self._lock = threading.Lock()

    def get(self, key: str, requests: int = 1) -> ImageFeatures | None:
        """The features, or None, for `requests` requests on the image: counted per request, and when the image
        must be encoded, one request misses and the others share its encoding (they count as hits)."""
        with self._lock:
            features = self._entries.get(key)
            if features is None:
                self._misses += 1
                self._hits += requests - 1
                return None
            self._entries.move_to_end(key)
            self._hits += requests
            return features

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def put(self, key: str, features: ImageFeatures) -> None:
        size = features.nbytes
        if size > self.max_bytes:
            return
        with self._lock:
            previous = self._entries.pop(key, None)
            if previous is not None:
                self._bytes -= previous.nbytes
            while self._entries and self._bytes + size > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes
                self._evictions += 1
            self._entries[key] = features
            self._bytes += size

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self._hits, self._misses, self._evictions, self._bytes, len(self._entries))
