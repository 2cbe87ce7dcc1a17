"""The official MCP SDK's client, driven from synchronous tests: over Streamable HTTP with a Bearer key."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client


def over_http(base_url: str, key: str, work: Callable[[Client], Awaitable[Any]], *, mode: str = "auto") -> Any:
    """Run ``work`` with a client connected to ``base_url``/mcp and return what it returns. ``mode``
    "legacy": the initialize handshake of protocol versions before 2026-07-28, as most hosts still send."""

    async def main() -> Any:
        async with (
            httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=120) as http,
            Client(streamable_http_client(f"{base_url}/mcp", http_client=http), mode=mode) as client,
        ):
            return await work(client)

    return anyio.run(main)
