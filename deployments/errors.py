"""One error mapper: any exception to the wire's `ErrorResponse` and an HTTP status (vLLM style)."""

from __future__ import annotations

import logging

from ray.exceptions import ObjectLostError
from ray.serve.exceptions import RayServeException

from client.errors import Sam3Error, ServiceUnavailableError
from client.handle_client import as_sam3_error as typed_error
from client.handle_client import unwrap_ray_error
from client.protocol import ErrorDetail, ErrorResponse

logger = logging.getLogger("ray.serve")


def as_sam3_error(error: BaseException) -> Sam3Error:
    """Typed errors (ours, back-pressure, timeouts) map as the clients map them; anything else is logged
    here and answered as an internal error that does not leak its details."""
    cause = unwrap_ray_error(error)
    if type(cause) is RayServeException:
        # Raised by Serve's router inside our chain, e.g. when a replica died holding a request's input:
        # the application is fine, the replica is being replaced, so the request can be retried.
        logger.warning("request lost to a replica failure: %s", str(cause).splitlines()[0])
        return ServiceUnavailableError("a replica failed while handling the request: retry")
    if isinstance(cause, ObjectLostError):
        # A stage's output lived on a node that was lost before the next stage read it: nothing is wrong
        # with the request, and a retry runs it on the replicas that are left.
        logger.warning("request lost with a node: %s", str(cause).splitlines()[0])
        return ServiceUnavailableError("a node holding the request's intermediate result was lost: retry")
    typed = typed_error(cause)
    if type(typed) is Sam3Error and not isinstance(cause, Sam3Error):
        logger.error("unexpected error while serving a request", exc_info=cause)
        return Sam3Error(f"internal error ({type(cause).__name__})")
    return typed


def error_body(error: Sam3Error) -> ErrorResponse:
    return ErrorResponse(error=ErrorDetail(code=error.code, message=error.message, request_id=error.request_id))
