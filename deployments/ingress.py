"""The HTTP ingress: a thin router over one `segment` method that the handle client calls too.

Data never passes through here: the ingress chains `DeploymentResponse`s (preprocessor -> model pool ->
postprocessor) and awaits only the last, so images and masks go replica to replica.
"""

# No `from __future__ import annotations` here: FastAPI must resolve the route annotations at import.

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException

from client.errors import InvalidRequestError, NotFoundError, Sam3Error
from client.protocol import (
    API_VERSION,
    HEALTH_PATH,
    SEGMENT_PATH,
    ErrorResponse,
    HealthResponse,
    SegmentRequest,
    SegmentResponse,
)
from deployments.errors import as_sam3_error, error_body

app = FastAPI(
    title="SAM 3 segmentation",
    version=API_VERSION,
    description="Segment Anything Model 3 on Ray Serve: text, box-exemplar and point prompts.",
)

ERROR_RESPONSES = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "Malformed request (unknown fields, bad JSON, undecodable image)",
        413: "Image over the pixel limit",
        422: "Invalid prompt",
        500: "Internal error",
        503: "Overloaded: retry later",
    }.items()
}


def error_response(error: Sam3Error) -> JSONResponse:
    return JSONResponse(error_body(error).model_dump(), status_code=error.http_status)


def validation_message(error: ValidationError) -> str:
    problems = [f"{'.'.join(str(part) for part in item['loc']) or 'body'}: {item['msg']}" for item in error.errors()[:5]]
    return "invalid request: " + "; ".join(problems)


@app.exception_handler(HTTPException)
async def http_error(_: Request, error: HTTPException) -> JSONResponse:
    """Unknown routes and methods answer in the same JSON error shape as everything else."""
    typed = NotFoundError(f"no such endpoint; this API is {SEGMENT_PATH}") if error.status_code == 404 else None
    typed = typed or InvalidRequestError(str(error.detail))
    response = error_response(typed)
    response.status_code = error.status_code
    return response


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=256)
@serve.ingress(app)
class Sam3Ingress:
    def __init__(self, preprocessor: DeploymentHandle, model_pool: DeploymentHandle, postprocessor: DeploymentHandle):
        self.preprocessor = preprocessor
        self.model_pool = model_pool
        self.postprocessor = postprocessor

    async def segment(self, request: SegmentRequest) -> SegmentResponse:
        """The one data path, for HTTP and Serve handle callers alike; raises typed `Sam3Error`s."""
        prepared = self.preprocessor.prepare.remote(request)
        result = self.model_pool.run.remote(prepared)
        try:
            return await self.postprocessor.finish.remote(result, request.prompt_type, request.return_detections)
        except Exception as error:
            raise as_sam3_error(error) from None

    @app.post(
        SEGMENT_PATH,
        response_model=SegmentResponse,
        responses=ERROR_RESPONSES,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": SegmentRequest.model_json_schema(mode="validation")}},
            }
        },
    )
    async def segment_http(self, http_request: Request) -> Response:
        """Parses the body itself: the image is base64 in JSON, which only `model_validate_json` decodes."""
        try:
            request = SegmentRequest.model_validate_json(await http_request.body())
        except ValidationError as error:
            return error_response(InvalidRequestError(validation_message(error)))
        try:
            response = await self.segment(request)
        except Sam3Error as error:
            return error_response(error)
        return Response(response.model_dump_json(), media_type="application/json")

    @app.get(HEALTH_PATH, response_model=HealthResponse)
    async def health(self) -> HealthResponse:
        """Cheap by design: answers without touching the model."""
        return HealthResponse()
