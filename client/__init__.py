"""Clients for the SAM 3 segmentation service: over HTTP (blocking, or asyncio), or over a Ray Serve handle
inside a Ray cluster.

All three implement the one API of client-api.txt (`run`, `run_with_detections`; the asyncio client's are
coroutines) and raise only the typed errors below. The blocking two also track objects through videos
(`track`, and `masklets` to collect its frames per object). Importing this package needs light libraries only (no torch, no Ray).
"""

from client.errors import (
    AuthenticationError,
    ConnectionFailedError,
    ImageNotCachedError,
    ImageTooLargeError,
    InvalidImageError,
    InvalidPromptError,
    InvalidRequestError,
    InvalidVideoError,
    ModelNotFoundError,
    NotFoundError,
    PromptTooLongError,
    RequestTimeoutError,
    Sam3Error,
    ServiceUnavailableError,
    SessionNotFoundError,
    VideoTooLongError,
)
from client._video import masklets
from client.async_http_client import AsyncSam3HttpClient
from client.handle_client import Sam3HandleClient
from client.http_client import Sam3HttpClient
from client.protocol import SegmentRequest, SegmentResponse

__all__ = [
    "AsyncSam3HttpClient",
    "AuthenticationError",
    "ConnectionFailedError",
    "ImageNotCachedError",
    "ImageTooLargeError",
    "InvalidImageError",
    "InvalidPromptError",
    "InvalidRequestError",
    "InvalidVideoError",
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
    "SessionNotFoundError",
    "VideoTooLongError",
    "masklets",
]
