"""Exceptions -> HTTP, in one place. Every error body is JSON in the route's dialect envelope."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.safety import FLAGGED_CODE
from ..errors import (
    ClientDisconnected,
    Conflict,
    FluxServeError,
    Forbidden,
    GenerationFailed,
    Gone,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    PaymentRequired,
    QuotaExceeded,
    RateLimited,
    RequestTimeout,
    StoreUnavailable,
    Unauthorized,
    UnsupportedMediaType,
    UpstreamFailed,
)
from ..job import Job
from ..storage import StorageUnreachable

log = logging.getLogger(__name__)

# Room for a 50 MB image as base64 in a JSON field (data: URLs, BFL input_image).
M = TypeVar("M", bound=BaseModel)


class HttpError(FluxServeError):
    """A status Starlette decided (an unmatched route: 404, a wrong method: 405), rendered like ours."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message, code="not_found" if status == 404 else "http_error")
        self.status = status


# Each core exception's HTTP status and OpenAI error type; the nearest class in an exception's MRO wins.
_HTTP: dict[type[FluxServeError], tuple[int, str]] = {
    InvalidInput: (400, "invalid_request_error"),
    PayloadTooLarge: (413, "invalid_request_error"),
    UnsupportedMediaType: (415, "invalid_request_error"),
    RequestTimeout: (408, "invalid_request_error"),
    Unauthorized: (401, "invalid_request_error"),
    Forbidden: (403, "invalid_request_error"),
    NotFound: (404, "invalid_request_error"),
    Gone: (410, "invalid_request_error"),
    Conflict: (409, "invalid_request_error"),
    RateLimited: (429, "requests"),
    PaymentRequired: (402, "insufficient_quota"),
    QuotaExceeded: (403, "insufficient_quota"),
    ClientDisconnected: (499, "invalid_request_error"),
    UpstreamFailed: (502, "server_error"),
    GenerationFailed: (500, "server_error"),
    StoreUnavailable: (503, "server_error"),
}


def job_failure(job: Job) -> FluxServeError:
    """What a synchronous dialect answers for a job that did not succeed: a provider's refusal (moderation,
    bad input) is the client's 400, a provider's account or setup problem a 502, anything else a 500."""
    if job.error_code == FLAGGED_CODE:  # withheld by the safety check: OpenAI's code for it
        return InvalidInput(job.error or "The image was withheld by the safety check.", code="moderation_blocked")
    if job.error_code == "upstream_rejected":
        return InvalidInput(job.error or "The upstream provider refused the request.", code="upstream_rejected")
    if job.error_code == UpstreamFailed.code:
        return UpstreamFailed(job.error or "The upstream provider could not serve the request.")
    return GenerationFailed(job.error or f"The image generation ended as {job.status.value}.")


def http_status(exc: FluxServeError) -> tuple[int, str]:
    """(status, OpenAI error type) of an exception."""
    if isinstance(exc, HttpError):
        return exc.status, "invalid_request_error" if exc.status < 500 else "server_error"
    for cls in type(exc).__mro__:
        if cls in _HTTP:
            return _HTTP[cls]
    return 500, "server_error"


def openai_error(status: int, message: str, type_: str, param: str | None, code: str | None) -> JSONResponse:
    """The OpenAI envelope; the seed's relay answers /vmodel errors in it too."""
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def field_details(exc: FluxServeError) -> list[dict[str, object]]:
    if exc.details:
        return exc.details
    loc: list[object] = ["body", *(exc.param or "body").split(".")] if exc.param not in (None, "body") else ["body"]
    return [{"loc": loc, "msg": exc.message, "type": exc.code}]


def render_openai(exc: FluxServeError) -> JSONResponse:
    status, type_ = http_status(exc)
    return openai_error(status, exc.message, type_, exc.param, exc.code)


def render_replicate(exc: FluxServeError) -> JSONResponse:
    """RFC 7807 problem details, as Replicate answers; bad input is a 422 there."""
    status, _ = http_status(exc)
    status = 422 if status == 400 else status
    body: dict[str, object] = {
        "type": exc.code,
        "title": _TITLES.get(status, "Error"),
        "status": status,
        "detail": exc.message,
    }
    if status == 422:
        body["invalid_fields"] = [
            {"type": d["type"], "field": ".".join(str(p) for p in d["loc"] if p != "body"), "description": d["msg"]}  # type: ignore[attr-defined]
            for d in field_details(exc)
        ]
    return JSONResponse(body, status_code=status, media_type="application/problem+json")


def render_bfl(exc: FluxServeError) -> JSONResponse:
    """BFL (FastAPI underneath): 422 {"detail": [{loc, msg, type}]} for bad input, {"detail": "..."} otherwise."""
    status, _ = http_status(exc)
    if status in (400, 422):
        return JSONResponse({"detail": field_details(exc)}, status_code=422)
    return JSONResponse({"detail": exc.message}, status_code=status)


_TITLES = {
    401: "Unauthenticated",
    404: "Not found",
    408: "Request timeout",
    409: "Conflict",
    410: "Gone",
    413: "Payload too large",
    415: "Unsupported media type",
    429: "Too many requests",
    422: "Input validation failed",
    500: "Internal server error",
    503: "Service unavailable",
}


STORAGE_AWAY = "The image storage could not be reached; retry later."


def install_error_handlers(app: FastAPI, render_error: Callable[[Request, FluxServeError], JSONResponse]) -> None:
    """``render_error`` picks the envelope by path (api/dialects.py)."""

    @app.exception_handler(FluxServeError)
    async def _fluxserve(request: Request, exc: FluxServeError) -> JSONResponse:
        response = render_error(request, exc)
        if isinstance(exc, StoreUnavailable):  # the database is busy: clients (the SDKs among them) retry after this
            response.headers["Retry-After"] = "2"
        if isinstance(exc, RateLimited):
            response.headers.update({**exc.headers, "Retry-After": str(exc.retry_after)})
        return response

    @app.exception_handler(StorageUnreachable)
    async def _storage(request: Request, exc: StorageUnreachable) -> JSONResponse:
        log.warning("storage unreachable: %s", exc)
        return await _fluxserve(request, StoreUnavailable(STORAGE_AWAY, code="storage_unavailable"))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return render_error(request, from_validation_errors(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return render_error(request, HttpError(str(exc.detail), exc.status_code))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return render_error(request, FluxServeError("The server had an error while processing your request."))


def from_validation_errors(errors: list[Any], prefix: str = "") -> InvalidInput:
    """Pydantic errors -> one InvalidInput naming the first bad field (others in the message)."""

    def name(err: Any) -> str:
        loc = [str(p) for p in err.get("loc", ())]
        if loc and loc[0] in (
            "body",
            "query",
            "path",
            "header",
        ):  # FastAPI's where, not a field (a field may be "path")
            loc = loc[1:]
        return prefix + ".".join(loc) if loc else prefix.rstrip(".") or "body"

    def describe(err: Any) -> str:
        if err.get("type") == "extra_forbidden":
            return f"Unknown parameter '{name(err)}'."
        if err.get("type") == "missing":
            return f"Missing required parameter '{name(err)}'."
        return f"Invalid value for '{name(err)}': {err.get('msg')}."

    first = errors[0]
    message = " ".join(describe(e) for e in errors[:5])
    code = {"missing": "missing_required_parameter", "extra_forbidden": "unknown_parameter"}.get(
        first.get("type"), "invalid_value"
    )
    details: list[dict[str, object]] = [
        {"loc": ["body", *name(e).split(".")], "msg": describe(e), "type": e.get("type", "value_error")} for e in errors
    ]
    return InvalidInput(message, param=name(first), code=code, details=details)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON value")


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """openapi_extra declaring a route's JSON body (it is read by read_json, so FastAPI can't see it):
    clients and fuzzers (schemathesis in the tests) learn the fields, types and ranges."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline_schema(model)}}}}


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema with its $defs written in place (the document has no components for them)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved


async def read_json(request: Request, model: type[M], *, prefix: str = "") -> M:
    """Parse and validate a JSON body ourselves, so every failure names the field."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise UnsupportedMediaType(
            f"Content-Type must be application/json; got {ctype or 'none'!r}.", param="Content-Type"
        )
    body = await request.body()  # bounded while it streams in by api/bodylimit.py, per route
    if len(body) > PARSE_OFF_LOOP_BYTES:  # megabytes of base64 images: parsed on the slow-work threads
        services = getattr(request.app.state, "services", None)
        if services is not None:
            parsed: M = await services.jobs.run_slow(parse_json, body, model, prefix)
            return parsed
    return parse_json(body, model, prefix)


PARSE_OFF_LOOP_BYTES = 256 * 1024  # parsing this much takes ~2 ms; 65 MB took 1.8 s of the event loop


def parse_json(body: bytes, model: type[M], prefix: str = "") -> M:
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InvalidInput(f"The request body is not valid JSON: {exc}.", param="body", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise InvalidInput("The request body must be a JSON object.", param="body", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise from_validation_errors(list(exc.errors()), prefix) from exc
