"""One error mapper: any exception to the wire's `ErrorResponse` and an HTTP status (vLLM style)."""

from __future__ import annotations

import logging

from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError

from client.errors import Sam3Error, ServiceUnavailableError
from client.protocol import ErrorDetail, ErrorResponse

logger = logging.getLogger("ray.serve")


def unwrap(error: BaseException) -> BaseException:
    """The error a downstream replica raised, without Ray's `RayTaskError` wrappers."""
    while isinstance(error, RayTaskError) and error.cause is not None:
        error = error.cause
    return error


def as_sam3_error(error: BaseException) -> Sam3Error:
    """A typed error for anything: ours pass through; unexpected ones are logged and made internal."""
    error = unwrap(error)
    if isinstance(error, Sam3Error):
        return type(error)(str(error.args[0]) if error.args else error.code)
    if isinstance(error, BackPressureError):
        return ServiceUnavailableError("the service is overloaded: retry later")
    logger.error("unexpected error while serving a request", exc_info=error)
    return Sam3Error(f"internal error ({type(error).__name__})")


def error_body(error: Sam3Error) -> ErrorResponse:
    return ErrorResponse(error=ErrorDetail(code=error.code, message=str(error)))
