"""x-ratelimit-* headers on create responses, from what the job service admitted (fluxserve.limits)."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..limits import RATE_HEADERS


class RateLimitHeaders:
    """Pure ASGI (no task hop): a POST's handler fills a holder that this adds to the response head."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        holder: dict[str, str] = {}
        token = RATE_HEADERS.set(holder)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start" and holder:
                extra = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in holder.items()]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            RATE_HEADERS.reset(token)
