"""Request bodies bounded while they stream in, in size (413) and in time (408), in the dialect's shape.

Multipart uploads may send up to UPLOAD_BODY_BYTES, JSON routes that take images as data: URLs or
base64 up to IMAGE_JSON_BODY_BYTES (one 50 MB image, base64-encoded, plus fields), every other body
is JSON of at most JSON_BODY_BYTES. This is the one body limit; handlers don't count again. A
declared Content-Length over it is refused before a byte is read; a chunked body is cut off as
soon as it passes it.
"""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import PayloadTooLarge, RequestTimeout
from .dialects import render_error

JSON_BODY_BYTES = 1024 * 1024
IMAGE_JSON_BODY_BYTES = 70 * 1024 * 1024
UPLOAD_BODY_BYTES = 100 * 1024 * 1024
_UPLOAD_ROUTES = ("/v1/images/edits", "/v1/images/variations")
_IMAGE_JSON_ROUTES = ("/vmodel/generate", "/v1/predictions", "/v1/flux-")
_KINDS = {
    JSON_BODY_BYTES: "JSON without images",
    IMAGE_JSON_BODY_BYTES: "JSON with images",
    UPLOAD_BODY_BYTES: "uploads",
}


def body_limit(path: str) -> int:
    if path.startswith(_UPLOAD_ROUTES):
        return UPLOAD_BODY_BYTES
    if path.startswith(_IMAGE_JSON_ROUTES) or (path.startswith("/v1/models/") and path.endswith("/predictions")):
        return IMAGE_JSON_BODY_BYTES
    return JSON_BODY_BYTES


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"The request body is larger than this route's limit of {limit} bytes ({_KINDS[limit]}).", param="body"
    )


class BodyLimit:
    def __init__(self, app: ASGIApp, idle_s: float = 30.0) -> None:
        self.app = app
        self.idle_s = idle_s  # a body that stops arriving this long is a 408, not a held connection

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        limit = body_limit(scope["path"])
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await render_error(Request(scope), _too_large(limit))(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            try:
                async with asyncio.timeout(self.idle_s):
                    message = await receive()
            except TimeoutError:
                raise RequestTimeout(
                    f"The request body stopped arriving for {self.idle_s:g} s.", param="body"
                ) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    # Raised where the handler reads the body: the error handlers render it.
                    raise _too_large(limit)
            return message

        await self.app(scope, counted, send)
