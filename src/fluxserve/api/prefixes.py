"""The seed relay's provider prefixes: ``/bfl/v1/...`` and ``/replicate/v1/...`` are the BFL and Replicate
dialects' own routes under a prefix (as relays that sell several providers from one host expose them).

Pure ASGI, outermost: the prefix is taken off before routing, body limits and error envelopes, so every
one of them is the dialect's own, and only paths that dialect owns are reachable under its prefix (a
``/bfl/v1/images/generations`` is a 404, not OpenAI's route). URLs in responses (``polling_url``,
``urls.get``) are the unprefixed ones, which the same key reaches.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send


class ProviderPrefixes:
    def __init__(self, app: ASGIApp, prefixes: dict[str, Callable[[str], bool]]) -> None:
        self.app = app
        self._prefixes = prefixes  # "/bfl" -> does the BFL dialect own this unprefixed path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            for prefix, owns in self._prefixes.items():
                inner = path[len(prefix) :]
                if path.startswith(prefix + "/v1/") and owns(inner):
                    raw = scope.get("raw_path") or path.encode()
                    scope = {**scope, "path": inner, "raw_path": raw[len(prefix) :]}
                    break
        await self.app(scope, receive, send)
