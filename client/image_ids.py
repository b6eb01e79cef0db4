"""The service's ids for images a client has sent, so asking again about one sends its id, not its bytes.

The service answers each image with an `image_id` and keeps that image's vision features for a while; a
request that names the id skips the upload, the decode and the vision pass. The ids are only hints: the
service may have evicted the features since (`ImageNotCachedError`), and then the client sends the bytes again.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

from client.protocol import SegmentRequest

ImageKey = tuple[str | None, bytes]


def image_key(request: SegmentRequest) -> ImageKey:
    """The model and a hash of the exact bytes sent: the service's id is per checkpoint, and only equal bytes are
    surely the same image."""
    return request.model_id, hashlib.blake2b(request.image, digest_size=16).digest()


class ImageIds:
    """The `capacity` most recently used image ids, thread-safe (the bulk calls share it across worker threads).

    It pickles empty, so a client still travels into Ray tasks (a lock does not pickle; the ids are only hints).
    """

    def __init__(self, capacity: int = 256):
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._ids: OrderedDict[ImageKey, str] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: ImageKey) -> str | None:
        with self._lock:
            image_id = self._ids.get(key)
            if image_id is not None:
                self._ids.move_to_end(key)
            return image_id

    def put(self, key: ImageKey, image_id: str) -> None:
        with self._lock:
            self._ids[key] = image_id
            self._ids.move_to_end(key)
            if len(self._ids) > self.capacity:
                self._ids.popitem(last=False)

    def forget(self, key: ImageKey) -> None:
        with self._lock:
            self._ids.pop(key, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._ids)

    def __getstate__(self) -> dict[str, int]:
        return {"capacity": self.capacity}

    def __setstate__(self, state: dict[str, int]) -> None:
        self.__init__(state["capacity"])
