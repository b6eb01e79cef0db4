"""Clients for the SAM 3 segmentation service: over HTTP, or over a Ray Serve handle inside a Ray cluster.

Both implement the one API of client-api.txt (`run`, `run_with_detections`) and raise only the typed
errors below. Importing this package needs light libraries only (no torch, no Ray).
"""

from client.errors import (
    AuthenticationError,
    ConnectionFailedError,
    ImageNotCachedError,
    ImageTooLargeError,
    InvalidImageError,
    InvalidPromptError,
    InvalidRequestError,
    ModelNotFoundError,
    NotFoundError,
    PromptTooLongError,
    RequestTimeoutError,
    Sam3Error,
    ServiceUnavailableError,
)
from client.handle_client import Sam3HandleClient
from client.http_client import Sam3HttpClient
from client.protocol import SegmentRequest, SegmentResponse

__all__ = [
    "AuthenticationError",
    "ConnectionFailedError",
    "ImageNotCachedError",
    "ImageTooLargeError",
    "InvalidImageError",
    "InvalidPromptError",
    "InvalidRequestError",
    "ModelNotFoundError",
    "NotFoundError",
    "PromptTooLongError",
    "RequestTimeoutError",
    "Sam3Error",
    "Sam3HandleClient",
    "Sam3HttpClient",
    "SegmentRequest",
    "SegmentResponse",
    "ServiceUnavailableError",
]
