"""The one exception hierarchy shared by the server, the HTTP client and the handle client.

Each error carries a stable machine-readable ``code`` and the HTTP status the ingress answers with,
so a client can rebuild the same typed exception from a JSON error body.
"""

from __future__ import annotations


class Sam3Error(Exception):
    """Base of every error this project raises on purpose."""

    code = "internal_error"
    http_status = 500
    # Seconds the server asked the caller to wait before retrying (its `Retry-After`), when it said so.
    retry_after_s: float | None = None
    # The id of the request that failed (`X-Request-Id`), which the server's logs name: quote it when asking.
    request_id: str | None = None

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message if self.request_id is None else f"{self.message} (request id {self.request_id})"


class InvalidRequestError(Sam3Error):
    """The request is malformed: the caller must change it before retrying."""

    code = "invalid_request"
    http_status = 400


class InvalidImageError(InvalidRequestError):
    """The image cannot be decoded, is empty, or has an unsupported layout."""

    code = "invalid_image"


class ImageTooLargeError(InvalidRequestError):
    """The image has more pixels than the server accepts."""

    code = "image_too_large"
    http_status = 413


class RequestTooLargeError(InvalidRequestError):
    """The request body is larger than the server accepts."""

    code = "request_too_large"
    http_status = 413


class UnsupportedMediaTypeError(InvalidRequestError):
    """The request body is not JSON (`Content-Type: application/json`)."""

    code = "unsupported_media_type"
    http_status = 415


class InvalidVideoError(InvalidRequestError):
    """The video cannot be decoded: not a video file, no video stream, no frames, or it breaks off."""

    code = "invalid_video"


class VideoTooLongError(InvalidRequestError):
    """The video has more frames than the server accepts."""

    code = "video_too_long"
    http_status = 413


class InvalidPromptError(InvalidRequestError):
    """The prompt (text, points, boxes or labels) is missing or malformed."""

    code = "invalid_prompt"
    http_status = 422


class PromptTooLongError(InvalidPromptError):
    """The text prompt tokenizes to more tokens than the checkpoint's text encoder takes."""

    code = "prompt_too_long"


class AuthenticationError(Sam3Error):
    """The API key is missing or wrong."""

    code = "unauthorized"
    http_status = 401


class NotFoundError(Sam3Error):
    """No such route or application (a wrong path, API version, or Serve application name)."""

    code = "not_found"
    http_status = 404


class ModelNotFoundError(NotFoundError):
    """The request names a `model_id` the service does not serve."""

    code = "model_not_found"


class ImageNotCachedError(NotFoundError):
    """The request names an `image_id` whose features no replica holds any more: send the image itself."""

    code = "image_not_cached"


class SessionNotFoundError(NotFoundError):
    """The video session is gone: it ended, was evicted (idle too long, or for room), or its replica was lost.
    Start a new session."""

    code = "session_not_found"


class ServiceUnavailableError(Sam3Error):
    """The service is overloaded or starting: retrying later may succeed."""

    code = "unavailable"
    http_status = 503


class RequestTimeoutError(Sam3Error):
    """The request did not finish within its timeout."""

    code = "timeout"
    http_status = 504


class ConnectionFailedError(Sam3Error):
    """The client could not reach the service at all (no HTTP status)."""

    code = "connection_failed"
    http_status = 0


def _subclasses(cls: type[Sam3Error]) -> list[type[Sam3Error]]:
    return [cls] + [sub for direct in cls.__subclasses__() for sub in _subclasses(direct)]


ERRORS_BY_CODE: dict[str, type[Sam3Error]] = {cls.code: cls for cls in _subclasses(Sam3Error)}


def error_from_code(code: str, message: str) -> Sam3Error:
    """The typed exception for a wire error code; unknown codes become the base `Sam3Error`."""
    error = ERRORS_BY_CODE.get(code, Sam3Error)(message)
    if error.code != code:
        error.code = code
    return error
