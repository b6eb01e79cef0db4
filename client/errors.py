"""The one exception hierarchy shared by the server, the HTTP client and the handle client.

Each error carries a stable machine-readable ``code`` and the HTTP status the ingress answers with,
so a client can rebuild the same typed exception from a JSON error body.
"""

from __future__ import annotations


class Sam3Error(Exception):
    """Base of every error this project raises on purpose."""

    code = "internal_error"
    http_status = 500

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


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


class InvalidPromptError(InvalidRequestError):
    """The prompt (text, points, boxes or labels) is missing or malformed."""

    code = "invalid_prompt"
    http_status = 422


class PromptTooLongError(InvalidPromptError):
    """The text prompt tokenizes to more tokens than the checkpoint's text encoder takes."""

    code = "prompt_too_long"
