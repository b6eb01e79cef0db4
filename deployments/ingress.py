"""The HTTP ingress: a thin router over one `segment` method that the handle client calls too.

Images and masks go replica to replica through the object store. The ingress passes the preprocessor's
`DeploymentResponse` itself on to the model pool, chains the model pool's into the postprocessor, and awaits
the last. With the vision-feature cache on, it first reads the prepared item's image id (on the same node,
Ray maps its pixels without a copy) to route the model call by.
"""

# No `from __future__ import annotations` here: FastAPI must resolve the route annotations at import.

import asyncio
import logging
import time
from collections.abc import Coroutine

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponse
from starlette.exceptions import HTTPException

from client.errors import (
    AuthenticationError,
    error_from_code,
    InvalidRequestError,
    ModelNotFoundError,
    NotFoundError,
    RequestTimeoutError,
    RequestTooLargeError,
    Sam3Error,
    ServiceUnavailableError,
    UnsupportedMediaTypeError,
)
from client.protocol import (
    API_VERSION,
    HEALTH_PATH,
    INFO_PATH,
    READY_PATH,
    SEGMENT_PATH,
    ErrorResponse,
    HealthResponse,
    InfoResponse,
    SegmentRequest,
    SegmentResponse,
)
from client.video_protocol import (
    NDJSON,
    VIDEOS_PATH,
    TrackedFrame,
    TrackLine,
    TrackRequest,
    VideoPromptRequest,
    VideoPromptResponse,
    VideoSessionInfo,
)
from deployments.api_keys import is_authorized, load_api_keys
from deployments.availability import StageUnavailableError, StageWatch
from deployments.config import AppArgs
from deployments.errors import as_sam3_error, error_body
from deployments.metrics import UNKNOWN, IngressMetrics
from deployments.router_registry import replicas_by_model
from deployments.video_ingress import VIDEO, VideoIngress
from deployments.web import add_pages, service_info

logger = logging.getLogger("ray.serve")

# How long `/v1/info` waits for the preprocessor's reading of the checkpoints' resolutions (asked once).
IMAGE_SIZES_WAIT_S = 2.0

app = FastAPI(
    title="SAM 3 segmentation",
    version=API_VERSION,
    description="Segment Anything Model 3 on Ray Serve: text, box-exemplar and point prompts.",
    # `add_pages` serves /docs from local assets instead: FastAPI's own pages load theirs from a CDN.
    docs_url=None,
    redoc_url=None,
)
add_pages(app)

# Request bodies are parsed by hand (see `segment_http`), and the tracking stream is written by hand, so
# FastAPI does not describe them: their schemas and the models they refer to go under components, where the
# OpenAPI document's `$ref`s can find them.
REQUEST_COMPONENTS: dict[str, dict] = {}
for _model in (SegmentRequest, VideoPromptRequest, TrackRequest, TrackLine):
    _schema = _model.model_json_schema(mode="validation", ref_template="#/components/schemas/{model}")
    REQUEST_COMPONENTS.update(_schema.pop("$defs", {}), **{_model.__name__: _schema})


def body_of(media_type: str, schema: dict) -> dict:
    return {"requestBody": {"required": True, "content": {media_type: {"schema": schema}}}}


def json_body(model: type) -> dict:
    return body_of("application/json", {"$ref": f"#/components/schemas/{model.__name__}"})


BYTES = {"type": "string", "format": "binary"}


def openapi_document() -> dict:
    """FastAPI's document, with the hand-parsed request's models added to its components (made once)."""
    if app.openapi_schema is None:
        document = FastAPI.openapi(app)
        document.setdefault("components", {}).setdefault("schemas", {}).update(REQUEST_COMPONENTS)
    return app.openapi_schema


app.openapi = openapi_document

ERROR_RESPONSES = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "Malformed request (unknown fields, bad JSON, undecodable image)",
        401: "Missing or wrong API key (when the service has one)",
        413: "Body over the size limit, or image over the pixel limit",
        404: "A model_id the service does not serve (`model_not_found`)",
        415: "Body is not application/json",
        422: "Invalid prompt",
        500: "Internal error",
        503: "Overloaded or a replica is unavailable: retry after Retry-After seconds",
        504: "No answer within the request's timeout_s",
    }.items()
}


def error_response(error: Sam3Error, retry_after_s: int | None = None) -> JSONResponse:
    headers = {}
    if isinstance(error, ServiceUnavailableError) and retry_after_s is not None:
        headers["Retry-After"] = str(retry_after_s)
    if isinstance(error, AuthenticationError):
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(error_body(error).model_dump(), status_code=error.http_status, headers=headers)


def current_request_id() -> str:
    """Serve's id of the request being handled: the caller's `X-Request-Id` over HTTP, else one Serve made
    (a handle caller sees it as `DeploymentResponse.request_id`); the proxy returns it as `X-Request-Id`."""
    return serve.context._get_serve_request_context().request_id


def server_timing(response: SegmentResponse) -> str:
    """The stage timings as a `Server-Timing` header, which browsers' developer tools show."""
    return ", ".join(f"{stage};dur={ms:.1f}" for stage, ms in response.timings_ms.items())


async def read_body(http_request: Request, max_bytes: int) -> bytes:
    """The body, refused as soon as it is known to exceed `max_bytes` (declared or streamed)."""
    declared = http_request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise RequestTooLargeError(f"request body is {declared} bytes; at most {max_bytes} are accepted")
    chunks, size = [], 0
    async for chunk in http_request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise RequestTooLargeError(f"request body is over {max_bytes} bytes, the most accepted")
        chunks.append(chunk)
    return b"".join(chunks)


def check_content_type(http_request: Request) -> None:
    media_type = http_request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise UnsupportedMediaTypeError(f"send the request as application/json, not {media_type or 'no content type'}")


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


@serve.deployment
@serve.ingress(app)
class Sam3Ingress(VideoIngress):
    def __init__(
        self,
        preprocessor: DeploymentHandle,
        model_pool: DeploymentHandle,
        postprocessor: DeploymentHandle,
        args: AppArgs,
    ):
        self.preprocessor = preprocessor
        # Initialized now (`options` does it), so that its router follows the model replicas, and the models
        # each holds, from the start: `/v1/info` reports them before any request.
        self.model_pool = model_pool.options()
        self.postprocessor = postprocessor
        self.args = args
        self.api_keys = load_api_keys(args)
        self.max_body_bytes = args.max_body_bytes
        self.retry_after_s = args.retry_after_s
        self.metrics = IngressMetrics()
        self.image_sizes: dict[str, int] = {}
        context = serve.get_replica_context()
        self.app_name = context.app_name
        self.stages = StageWatch(context.app_name, context.deployment, args.unavailable_after_s)

    async def segment(self, request: SegmentRequest) -> SegmentResponse | Sam3Error:
        """The one data path, for HTTP and Serve handle callers alike: the answer, or a typed `Sam3Error`.

        The error is returned, not raised: Serve logs every exception raised out of a replica method with its
        full traceback (and counts it as a failed request), but a bad request is expected traffic. Every
        answer is counted here, and every failure is logged in one line with the request's id, which the
        error carries back to the caller (handle callers get the exception, raised by the handle client;
        HTTP callers its JSON body).
        """
        try:
            model_id = self.args.model_id_for(request.model_id)
        except ModelNotFoundError as error:
            self.record_failure(error, UNKNOWN, request.prompt_type)  # never a new series per unknown id
            return error
        try:
            response = await self._segment(request, model_id)
        except Sam3Error as error:
            self.record_failure(error, model_id, request.prompt_type)
            return error
        self.metrics.observe_answer(model_id, response)
        return response

    async def _segment(self, request: SegmentRequest, model_id: str) -> SegmentResponse:
        """The caller's `timeout_s` becomes a deadline that travels with the request: the model pool drops
        work still queued past it, and here the whole chain is cancelled when it runs out or when the
        caller goes away (a closed HTTP connection cancels this coroutine).

        The request's model id picks the preprocessor's tokenizer and geometry and, through Serve's model
        multiplexing, a model replica that holds that checkpoint.
        """
        started = time.perf_counter()
        deadline = time.time() + request.timeout_s if request.timeout_s else None
        in_flight: list[DeploymentResponse] = []
        try:
            answer = self._chain(request, model_id, deadline, in_flight)
            response = await asyncio.wait_for(self.stages.guard(answer), timeout=request.timeout_s)
        except (TimeoutError, asyncio.CancelledError, StageUnavailableError) as stopped:
            for stage_response in in_flight:
                stage_response.cancel()
            if isinstance(stopped, (asyncio.CancelledError, StageUnavailableError)):
                raise
            raise RequestTimeoutError(f"no answer within the request's timeout of {request.timeout_s} s") from None
        except Exception as error:
            raise as_sam3_error(error) from None
        total_ms = (time.perf_counter() - started) * 1000
        return response.model_copy(update={"timings_ms": {**response.timings_ms, "total": total_ms}})

    async def _chain(
        self, request: SegmentRequest, model_id: str, deadline: float | None, in_flight: list[DeploymentResponse]
    ) -> SegmentResponse:
        """Preprocessor, then model pool, then postprocessor, each response added to `in_flight` as it starts.

        It passes on the preprocessor's response, not the item: the model replica reads the item from the
        object store itself, and a refusal passes through the model pool and the postprocessor back here. With
        the vision-feature cache on, the ingress first reads the image's id from the prepared item, so that the
        model pool's request router can send the request to the replica that holds the image's features;
        without it there is no id, and the round trip through the ingress would only add time.
        """
        prepare = self.preprocessor.prepare.remote(request, model_id, deadline)
        in_flight.append(prepare)
        image_key = None
        if self.args.vision_cache_bytes > 0:
            prepared = await prepare
            if isinstance(prepared, Sam3Error):  # refused: the preprocessor returns it, so Serve logs no traceback
                raise prepared
            image_key = prepared.image_key
        result = self.model_pool.options(multiplexed_model_id=model_id).run.remote(prepare, image_key=image_key)
        final = self.postprocessor.finish.remote(result, request.prompt_type, request.outline_tolerance)
        in_flight += [result, final]
        answer = await final
        if isinstance(answer, Sam3Error):  # the model pool's typed error, passed on by the postprocessor
            raise answer
        return answer

    def record_failure(self, error: Sam3Error, model_id: str, prompt_type: str) -> None:
        """Count it, log it with the request id, and put that id on the error for the caller to quote."""
        error.request_id = current_request_id()
        self.metrics.observe_error(model_id, prompt_type, error.code)
        level = logging.WARNING if error.http_status >= 500 else logging.INFO
        logger.log(level, "request %s failed: %s %s: %s", error.request_id, error.http_status, error.code, error.message)

    @app.post(
        SEGMENT_PATH,
        response_model=SegmentResponse,
        responses=ERROR_RESPONSES,
        openapi_extra=json_body(SegmentRequest),
    )
    async def segment_http(self, http_request: Request) -> Response:
        """Checks the key, then the body, before anything else runs.

        Parses the body itself: the image is base64 in JSON, which only `model_validate_json` decodes.
        """
        request = await self.read_keyed(http_request, self.read_json(http_request, SegmentRequest), UNKNOWN)
        if isinstance(request, Response):
            return request
        response = await self.segment(request)
        if isinstance(response, Sam3Error):
            return error_response(response, self.retry_after_s)
        return Response(
            response.model_dump_json(), media_type="application/json", headers={"Server-Timing": server_timing(response)}
        )

    # --- video sessions (README, "Video"); the logic is `VideoIngress`'s, shared with handle callers ---------

    @app.post(
        VIDEOS_PATH,
        response_model=VideoSessionInfo,
        status_code=201,
        responses=ERROR_RESPONSES,
        openapi_extra=body_of("application/octet-stream", BYTES),
    )
    async def open_video_http(self, http_request: Request, model_id: str | None = None) -> Response:
        """A new session: the body is a video file (any container and codec FFmpeg reads), sent as it is, or
        empty for a live session whose frames come one by one."""
        video = await self.read_keyed(http_request, read_body(http_request, self.args.video.max_upload_bytes))
        if isinstance(video, Response):
            return video
        return self.json_answer(await self.open_video(video or None, model_id), status_code=201)

    @app.get(VIDEOS_PATH + "/{session_id}", response_model=VideoSessionInfo, responses=ERROR_RESPONSES)
    async def video_session_http(self, http_request: Request, session_id: str) -> Response:
        return await self.keyed(http_request, self.video_session(session_id))

    @app.post(
        VIDEOS_PATH + "/{session_id}/prompts",
        response_model=VideoPromptResponse,
        responses=ERROR_RESPONSES,
        openapi_extra=json_body(VideoPromptRequest),
    )
    async def prompt_video_http(self, http_request: Request, session_id: str) -> Response:
        """Texts for the whole video, or objects on a frame: `VideoPromptRequest` as JSON."""
        request = await self.read_keyed(http_request, self.read_json(http_request, VideoPromptRequest))
        if isinstance(request, Response):
            return request
        return self.json_answer(await self.prompt_video(session_id, request))

    @app.post(
        VIDEOS_PATH + "/{session_id}/frames",
        response_model=TrackedFrame,
        responses=ERROR_RESPONSES,
        openapi_extra=body_of("application/octet-stream", BYTES),
    )
    async def push_video_frame_http(self, http_request: Request, session_id: str) -> Response:
        """One more frame of a live session: the body is an image file; the answer is its tracked objects."""
        image = await self.read_keyed(http_request, read_body(http_request, self.max_body_bytes))
        if isinstance(image, Response):
            return image
        return self.json_answer(await self.push_video_frame(session_id, image))

    @app.post(
        VIDEOS_PATH + "/{session_id}/track",
        responses={
            200: {"content": {NDJSON: {"schema": {"$ref": "#/components/schemas/TrackLine"}}}, "description": "One line a frame"},
            **ERROR_RESPONSES,
        },
        openapi_extra={"requestBody": {"required": False, "content": json_body(TrackRequest)["requestBody"]["content"]}},
    )
    async def track_video_http(self, http_request: Request, session_id: str) -> Response:
        """Newline-delimited JSON `TrackLine`s as frames are tracked. The body (`TrackRequest` as JSON) may be
        empty. A failure before the first frame is an HTTP error; one after it is the stream's last line."""
        request = await self.read_keyed(http_request, self.read_track_request(http_request))
        if isinstance(request, Response):
            return request
        lines = self.track_video(session_id, request)
        first = await anext(lines)
        if first.type == "error" and not first.done:
            await lines.aclose()
            failure = error_from_code(first.error.code, first.error.message)
            failure.request_id = first.error.request_id
            return error_response(failure, self.retry_after_s)

        async def ndjson():
            try:
                yield first.model_dump_json() + "\n"
                async for line in lines:
                    yield line.model_dump_json() + "\n"
            finally:  # the client went away: stop tracking for it
                await lines.aclose()

        return StreamingResponse(ndjson(), media_type=NDJSON)

    @app.delete(VIDEOS_PATH + "/{session_id}", status_code=204, responses=ERROR_RESPONSES)
    async def close_video_http(self, http_request: Request, session_id: str) -> Response:
        response = await self.keyed(http_request, self.close_video(session_id))
        return Response(status_code=204) if response.status_code == 200 else response

    async def read_track_request(self, http_request: Request) -> TrackRequest:
        return await self.read_json(http_request, TrackRequest) if await http_request.body() else TrackRequest()

    async def read_keyed(self, http_request: Request, read: Coroutine, prompt_type: str = VIDEO):
        """What `read` reads from the request once its key is checked, or the response to the first failure of
        the two, counted and logged. `read` is not started when the key is refused."""
        try:
            self.check_key(http_request)
            return await read
        except Sam3Error as error:
            read.close()
            self.record_failure(error, UNKNOWN, prompt_type)
            return error_response(error, self.retry_after_s)

    def check_key(self, http_request: Request) -> None:
        if not is_authorized(http_request.headers.get("authorization"), self.api_keys):
            raise AuthenticationError("missing or wrong API key: send `Authorization: Bearer <key>`")

    async def read_json(self, http_request: Request, model: type):
        check_content_type(http_request)
        body = await read_body(http_request, self.max_body_bytes)
        try:
            return model.model_validate_json(body)
        except ValidationError as error:
            raise InvalidRequestError(validation_message(error)) from None

    async def keyed(self, http_request: Request, answer) -> Response:
        """The answer of a request with no body, once its key is checked."""
        try:
            self.check_key(http_request)
        except Sam3Error as error:
            answer.close()
            self.record_failure(error, UNKNOWN, VIDEO)
            return error_response(error, self.retry_after_s)
        return self.json_answer(await answer)

    def json_answer(self, answer, status_code: int = 200) -> Response:
        if isinstance(answer, Sam3Error):
            return error_response(answer, self.retry_after_s)
        body = "null" if answer is None else answer.model_dump_json()
        return Response(body, media_type="application/json", status_code=status_code)

    @app.get(HEALTH_PATH, response_model=HealthResponse)
    async def health(self) -> HealthResponse:
        """Liveness: 200 while the ingress runs, with the application's readiness in the body. Cheap by
        design: it reads the stage watch, never the model."""
        reason = await self.stages.readiness()
        return HealthResponse(ready=reason is None, reason=reason)

    @app.get(READY_PATH, response_model=HealthResponse, responses={503: ERROR_RESPONSES[503]})
    async def ready(self) -> Response:
        """Readiness, for load balancers and probes: 200 once every stage has a running replica, else 503
        with the reason (a stage still starting, or the error that keeps it from starting)."""
        reason = await self.stages.readiness()
        if reason is not None:
            return error_response(ServiceUnavailableError(f"not ready: {reason}"), self.retry_after_s)
        return JSONResponse(HealthResponse().model_dump())

    @app.get(INFO_PATH, response_model=InfoResponse)
    async def info(self) -> InfoResponse:
        """Open like health, and nearly as cheap: what the playground page needs before its first request.
        Which replicas hold which model is the router's knowledge; the resolutions are asked of the
        preprocessor until it has answered once."""
        if not self.image_sizes:
            self.image_sizes = await self._read_image_sizes()
        return service_info(
            self.args, self.api_keys is not None, self.image_sizes, replicas_by_model(self.app_name)
        )

    async def _read_image_sizes(self) -> dict[str, int]:
        """The checkpoints' resolutions as the preprocessor read them; none while it cannot answer soon."""
        asked = self.preprocessor.image_sizes.remote()
        try:
            return await asyncio.wait_for(asked, timeout=IMAGE_SIZES_WAIT_S)
        except Exception as error:
            asked.cancel()
            logger.info("the models' resolutions are unknown for now: %r", error)
            return {}
