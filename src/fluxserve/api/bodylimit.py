"""Request bodies bounded while they stream in, in size (413) and in time (408), in the dialect's shape.

Routes that take images (multipart uploads, data: URLs, base64) may send up to IMAGE_BODY_BYTES;
every other body is JSON of at most JSON_BODY_BYTES. A declared Content-Length over the limit is
refused before a byte is read; a chunked body is cut off as soon as it passes the limit.
"""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import PayloadTooLarge, RequestTimeout
from .errors import render_error

JSON_BODY_BYTES = 1024 * 1024
IMAGE_BODY_BYTES = 100 * 1024 * 1024
_IMAGE_ROUTES = ("/v1/images/edits", "/v1/images/variations", "/vmodel/generate", "/v1/predictions", "/v1/flux-")


def body_limit(path: str) -> int:
    if path.startswith(_IMAGE_ROUTES) or (path.startswith("/v1/models/") and path.endswith("/predictions")):
        return IMAGE_BODY_BYTES
    return JSON_BODY_BYTES


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"The request body is larger than this route's limit of {limit} bytes "
        f"({'JSON without images' if limit == JSON_BODY_BYTES else 'with images'}).",
        param="body",
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
