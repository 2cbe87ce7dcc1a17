"""`fluxserve mcp --base URL`: the MCP tools of a fluxserve server over stdio, for desktop hosts that only
spawn processes. Each call goes to the server's /mcp as it comes (the transport there is stateless), so the
bridge starts even while the server is down and follows it through restarts; progress is passed along."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from .common import app

# A tool call waits up to 300 s on the server (wait_s); the bridge waits a little longer for its answer.
READ_TIMEOUT_S = 330.0


@app.command()
def mcp(
    base: Annotated[str, typer.Option(help="The fluxserve server's URL, e.g. http://127.0.0.1:8000.")],
    api_key: Annotated[
        str, typer.Option(envvar="FLUXSERVE_API_KEY", help="The API key the calls are made with.", show_default=False)
    ],
) -> None:
    """Serve the server's MCP tools (generate_image, edit_image, get_task, ...) on stdin/stdout."""
    import anyio

    anyio.run(_bridge, base.rstrip("/") + "/mcp", api_key)


async def _bridge(url: str, api_key: str) -> None:
    import httpx2
    import mcp.types as mt
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client
    from mcp.server.lowlevel import Server
    from mcp.server.stdio import stdio_server

    from .. import __version__

    headers = {"Authorization": f"Bearer {api_key}"}
    timeout = httpx2.Timeout(30.0, read=READ_TIMEOUT_S)

    async def remote(call: Any) -> Any:
        async with (
            httpx2.AsyncClient(headers=headers, timeout=timeout) as http,
            Client(streamable_http_client(url, http_client=http)) as client,
        ):
            return await call(client)

    async def list_tools(ctx: Any, params: mt.PaginatedRequestParams | None) -> mt.ListToolsResult:
        result: mt.ListToolsResult = await remote(lambda client: client.list_tools())
        return result

    async def call_tool(ctx: Any, params: mt.CallToolRequestParams) -> mt.CallToolResult:
        async def progress(done: float, total: float | None, message: str | None) -> None:
            await ctx.session.report_progress(done, total, message)

        try:
            result: mt.CallToolResult = await remote(
                lambda client: client.call_tool(params.name, params.arguments, progress_callback=progress)
            )
        except Exception as exc:  # the server is down or refused the key: the host shows why, the bridge stays
            text = f"fluxserve at {url} could not be reached: {_reason(exc)}"
            return mt.CallToolResult(content=[mt.TextContent(text=text)], is_error=True)
        return result

    server: Server[Any] = Server("fluxserve", version=__version__, on_list_tools=list_tools, on_call_tool=call_tool)
    async with stdio_server() as (read, write):
        await server.run(read, write, server.create_initialization_options())


def _reason(exc: BaseException) -> str:
    """The innermost cause of an exception group (the SDK's task groups wrap transport errors)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return json.dumps(f"{type(exc).__name__}: {exc}")[1:-1]
