"""Request bodies bounded while they stream in, in size (413) and in time (408), in the dialect's shape.

Each dialect's record (api/dialects.py) says which of its routes take what: multipart uploads up to
UPLOAD_BODY_BYTES, JSON with images as data: URLs or base64 up to IMAGE_JSON_BODY_BYTES (one 50 MB
image, base64-encoded, plus fields), any other body JSON of at most JSON_BODY_BYTES. This is the one
body limit; handlers don't count again. A declared Content-Length over it is refused before a byte is
read; a chunked body is cut off as soon as it passes it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import FluxServeError, PayloadTooLarge, RequestTimeout

JSON_BODY_BYTES = 1024 * 1024
IMAGE_JSON_BODY_BYTES = 70 * 1024 * 1024
UPLOAD_BODY_BYTES = 100 * 1024 * 1024
_KINDS = {
    JSON_BODY_BYTES: "JSON without images",
    IMAGE_JSON_BODY_BYTES: "JSON with images",
    UPLOAD_BODY_BYTES: "uploads",
}


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"The request body is larger than this route's limit of {limit} bytes ({_KINDS[limit]}).", param="body"
    )


def json_only(path: str) -> int:
    return JSON_BODY_BYTES


class BodyLimit:
    def __init__(
        self,
        app: ASGIApp,
        *,
        limit_for: Callable[[str], int],
        render: Callable[[Request, FluxServeError], Response],
        idle_s: float = 30.0,
    ) -> None:
        self.app = app
        self.limit_for = limit_for  # the route's dialect's rule
        self.render = render
        self.idle_s = idle_s  # a body that stops arriving this long is a 408, not a held connection

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self.render(Request(scope), _too_large(limit))(scope, receive, send)
            return
        seen = 0
        body_done = False

        async def counted() -> Message:
            nonlocal seen, body_done
            if body_done:
                # The body is in: what is awaited now is the client leaving (a stream's or a long wait's
                # disconnect listener), which may rightly take as long as the response does.
                return await receive()
            try:
                async with asyncio.timeout(self.idle_s):
                    message = await receive()
            except TimeoutError:
                raise RequestTimeout(
                    f"The request body stopped arriving for {self.idle_s:g} s.", param="body"
                ) from None
            if message["type"] == "http.request":
                body_done = not message.get("more_body", False)
                seen += len(message.get("body", b""))
                if seen > limit:
                    # Raised where the handler reads the body: the error handlers render it.
                    raise _too_large(limit)
            return message

        await self.app(scope, counted, send)
