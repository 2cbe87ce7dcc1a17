"""Exceptions -> HTTP, in one place. Every error body is JSON in the route's dialect envelope."""

from __future__ import annotations

import json
import logging
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import FluxServeError, InvalidInput, PayloadTooLarge, UnsupportedMediaType

log = logging.getLogger(__name__)

# Room for a 50 MB image as base64 in a JSON field (data: URLs, BFL input_image).
MAX_JSON_BODY = 70 * 1024 * 1024
M = TypeVar("M", bound=BaseModel)


def openai_error(status: int, message: str, type_: str, param: str | None, code: str | None) -> JSONResponse:
    """The OpenAI envelope; the seed's relay answers /vmodel errors in it too."""
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(FluxServeError)
    async def _fluxserve(_: Request, exc: FluxServeError) -> JSONResponse:
        return openai_error(exc.status_code, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = from_validation_errors(list(exc.errors()))
        return openai_error(err.status_code, err.message, err.type, err.param, err.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return openai_error(exc.status_code, str(exc.detail), type_, None, None)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return openai_error(500, "The server had an error while processing your request.", "server_error", None, None)


def from_validation_errors(errors: list[Any], prefix: str = "") -> InvalidInput:
    """Pydantic errors -> one InvalidInput naming the first bad field (others in the message)."""

    def name(err: Any) -> str:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
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
    return InvalidInput(message, param=name(first), code=code)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON value")


async def read_json(request: Request, model: type[M], *, prefix: str = "") -> M:
    """Parse and validate a JSON body ourselves, so every failure names the field."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise UnsupportedMediaType(
            f"Content-Type must be application/json; got {ctype or 'none'!r}.", param="Content-Type"
        )
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_JSON_BODY:
            raise PayloadTooLarge(f"The request body is larger than {MAX_JSON_BODY} bytes.", param="body")
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
