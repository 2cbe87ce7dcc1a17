"""MCP over Streamable HTTP at /mcp: fluxserve as an agent host's image tool, on the official SDK's server.

The tools are a dialect like any other: a call is validated into a spec, queued through the same submit path
(keys, limits, fairness, credits), and answered from the durable job. A job that outlives the call's wait
answers with its task id, which get_task polls; while a call waits, the job's steps come as MCP progress
notifications. The transport is stateless (every POST stands alone), so any API node answers any call.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import mcp.types as mt
from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.shared.auth import ProtectedResourceMetadata
from starlette.requests import Request
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from .. import __version__
from ..errors import FluxServeError, RateLimited, Unauthorized
from ..job import Job, Status
from .bodylimit import IMAGE_JSON_BODY_BYTES
from .deps import Services, ServicesDep, require_owner
from .dialect import Dialect
from .errors import http_status
from .inputs import elide_inline_images, submit
from .mcp_tools import (
    EditArgs,
    GenerateArgs,
    GetTaskArgs,
    NoArgs,
    TaskArgs,
    edit_spec,
    generate_spec,
    input_schema,
    parse,
)

PATH = "/mcp"
METADATA_PATH = "/.well-known/oauth-protected-resource" + PATH
_OWNER = "fluxserve_owner"  # the caller's owner id, in the request scope's state
_MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_INSTRUCTIONS = (
    "Image generation with FLUX models. generate_image and edit_image wait up to wait_s seconds; a job "
    "still running then comes back with its task id: call get_task with it (wait_s up to 300) until it is "
    "done. list_models says what each model takes."
)

Ctx = ServerRequestContext[Any, Request]
Handler = Callable[["McpTools", Ctx, str, Any], Awaitable[mt.CallToolResult]]


class McpTools:
    """One app's MCP server: the tools over its services, and the SDK's session manager that serves them."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.server: Server[Any] = Server(
            "fluxserve",
            version=__version__,
            instructions=_INSTRUCTIONS,
            on_list_tools=self._list_tools,
            on_call_tool=self._call_tool,
        )
        # Reference images come inline as data: URLs: the body limit is the dialects' for JSON with images
        # (BodyLimit enforces it first), not the SDK's 4 MB default.
        self.manager = StreamableHTTPSessionManager(
            app=self.server, stateless=True, max_request_body_size=IMAGE_JSON_BODY_BYTES
        )

    async def _list_tools(self, ctx: Ctx, params: mt.PaginatedRequestParams | None) -> mt.ListToolsResult:
        registry = self.services.registry
        tools = [
            mt.Tool(name=name, description=doc, input_schema=input_schema(args, registry))
            for name, (args, doc, _) in TOOLS.items()
        ]
        return mt.ListToolsResult(tools=tools)

    async def _call_tool(self, ctx: Ctx, params: mt.CallToolRequestParams) -> mt.CallToolResult:
        entry = TOOLS.get(params.name)
        if entry is None:
            return _error(f"Unknown tool {params.name!r}; the tools are {', '.join(TOOLS)}.", None, "unknown_tool")
        model, _, handler = entry
        owner = ctx.request.scope["state"][_OWNER] if ctx.request is not None else ""
        try:
            return await handler(self, ctx, owner, parse(model, params.arguments))
        except FluxServeError as exc:
            retry_after = exc.retry_after if isinstance(exc, RateLimited) else None
            return _error(exc.message, exc.param, exc.code, retry_after=retry_after)

    async def generate(self, ctx: Ctx, owner: str, args: GenerateArgs) -> mt.CallToolResult:
        spec = await generate_spec(self.services, owner, args)
        return await self._run(ctx, owner, spec, args, None)

    async def edit(self, ctx: Ctx, owner: str, args: EditArgs) -> mt.CallToolResult:
        spec, inputs = await edit_spec(self.services, owner, args)
        return await self._run(ctx, owner, spec, args, inputs)

    async def _run(self, ctx: Ctx, owner: str, spec: Any, args: Any, inputs: Any) -> mt.CallToolResult:
        assert ctx.request is not None
        echo = elide_inline_images(args.model_dump(exclude_none=True, exclude={"wait_s"}))
        job = await submit(self.services, ctx.request, owner, "mcp", spec, echo, inputs)
        job = await self._wait(ctx, owner, job, args.wait_s)
        return await self._render(job, failure_is_error=True)

    async def get_task(self, ctx: Ctx, owner: str, args: GetTaskArgs) -> mt.CallToolResult:
        job = await self.services.jobs.get(args.id, owner)
        if args.wait_s > 0 and not job.status.is_terminal:
            job = await self._wait(ctx, owner, job, args.wait_s)
        return await self._render(job, failure_is_error=False)

    async def cancel_task(self, ctx: Ctx, owner: str, args: TaskArgs) -> mt.CallToolResult:
        job = await self.services.jobs.cancel(args.id, owner)
        return await self._render(job, failure_is_error=False)

    async def list_models(self, ctx: Ctx, owner: str, args: NoArgs) -> mt.CallToolResult:
        models = [{"id": m.name, "label": m.label, **m.facts()} for m in self.services.registry]
        text = "\n".join(f"- {m['id']}: {m['kind']}, inputs {', '.join(m['inputs'])}" for m in models)
        return mt.CallToolResult(content=[mt.TextContent(text=text)], structured_content={"models": models})

    async def _wait(self, ctx: Ctx, owner: str, job: Job, wait_s: float) -> Job:
        """The job as it is once terminal or after ``wait_s``; each change meanwhile is a progress
        notification (none is sent unless the caller asked for them with a progress token)."""
        last = (job.status, job.progress_done)
        async for seen in self.services.jobs.watch(job.id, owner, timeout=wait_s):
            job = seen
            if (job.status, job.progress_done) != last:
                last = (job.status, job.progress_done)
                await ctx.session.report_progress(job.progress_done, job.progress_total or None, _progress(job))
        return job

    async def _render(self, job: Job, *, failure_is_error: bool) -> mt.CallToolResult:
        task = self._task(job)
        if job.status is Status.SUCCEEDED:
            content: list[mt.ContentBlock] = [mt.TextContent(text=_summary(job))]
            mime = _MIME[job.spec.output_format]
            for i, (out, image) in enumerate(zip(job.outputs, task["images"], strict=True)):
                data = await self.services.jobs.run_slow(self.services.storage.read, out.key)
                content.append(mt.ImageContent(data=base64.b64encode(data).decode(), mime_type=mime))
                name = f"{job.id}-{i}.{job.spec.output_format}"
                content.append(mt.ResourceLink(name=name, uri=image["url"], mime_type=mime))
            return mt.CallToolResult(content=content, structured_content=task)
        error = failure_is_error and job.status.is_terminal
        return mt.CallToolResult(content=[mt.TextContent(text=_summary(job))], structured_content=task, is_error=error)

    def _task(self, job: Job) -> dict[str, Any]:
        images = [
            {"url": self.services.storage.url(o.key), "seed": o.seed, "mime_type": _MIME[job.spec.output_format]}
            for o in job.outputs
        ]
        return {
            "id": job.id,
            "status": job.status.value,
            "progress": round(job.progress, 4),
            "steps": {"done": job.progress_done, "total": job.progress_total},
            "queue_position": job.queue_position,
            "model": job.spec.model,
            "size": f"{job.spec.width}x{job.spec.height}",
            "images": images,
            "error": job.error,
        }


def _progress(job: Job) -> str:
    if job.status is Status.QUEUED:
        where = f" (position {job.queue_position})" if job.queue_position is not None else ""
        return f"queued{where}"
    return f"{job.status.value}: step {job.progress_done} of {job.progress_total}"


def _summary(job: Job) -> str:
    if job.status is Status.SUCCEEDED:
        seeds = ", ".join(str(o.seed) for o in job.outputs)
        size = f"{job.spec.width}x{job.spec.height}"
        return f"Task {job.id} succeeded: {len(job.outputs)} image(s), {size}, seed {seeds}."
    if job.status.is_terminal:
        return f"Task {job.id} {job.status.value}: {job.error or 'no images'}."
    return (
        f"Task {job.id} is {_progress(job)}, {round(job.progress * 100)}% done. Call get_task with id "
        f"{job.id!r} (and wait_s up to 300) to get its images."
    )


def _error(message: str, param: str | None, code: str | None, *, retry_after: int | None = None) -> mt.CallToolResult:
    """A tool error: the model sees which argument to fix, and the host can read it structured."""
    text = message if param is None or param in message else f"{message} (argument: {param})"
    error: dict[str, Any] = {"message": message, "param": param, "code": code}
    if retry_after is not None:
        error["retry_after"] = retry_after
        text += f" Retry in {retry_after} s."
    return mt.CallToolResult(content=[mt.TextContent(text=text)], structured_content={"error": error}, is_error=True)


TOOLS: dict[str, tuple[type[Any], str, Handler]] = {
    "generate_image": (GenerateArgs, "Generate images from a text prompt.", McpTools.generate),
    "edit_image": (
        EditArgs,
        "Edit images, or make a new one from reference images, following a prompt (with a mask: inpaint).",
        McpTools.edit,
    ),
    "get_task": (GetTaskArgs, "A task's status, progress and, once done, its images.", McpTools.get_task),
    "cancel_task": (TaskArgs, "Cancel a queued or running task.", McpTools.cancel_task),
    "list_models": (NoArgs, "The models served here and what each takes.", McpTools.list_models),
}


class _Endpoint:
    """The SDK's transport behind fluxserve's keys: the caller's owner is found first (401 otherwise)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = scope["app"]
        request = Request(scope, receive)
        try:
            owner = await require_owner(request)
        except Unauthorized as exc:
            await _unauthorized(app.state.services, exc)(scope, receive, send)
            return
        scope.setdefault("state", {})[_OWNER] = owner
        tools: McpTools = app.state.mcp
        await tools.manager.handle_request(scope, receive, send)


def _unauthorized(services: Services, exc: Unauthorized) -> JSONResponse:
    """RFC 6750's challenge with RFC 9728's pointer to the resource metadata, as MCP's auth spec asks."""
    metadata = f"{services.settings.base_url}{METADATA_PATH}"
    challenge = f'Bearer error="invalid_token", error_description="{exc.message}", resource_metadata="{metadata}"'
    return JSONResponse(_jsonrpc_error(exc), status_code=401, headers={"WWW-Authenticate": challenge})


def _jsonrpc_error(exc: FluxServeError) -> dict[str, Any]:
    data = {"code": exc.code, "param": exc.param}
    return {"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": exc.message, "data": data}}


def render_error(exc: FluxServeError) -> JSONResponse:
    return JSONResponse(_jsonrpc_error(exc), status_code=http_status(exc)[0])


router = APIRouter()
router.routes.append(Route(PATH, _Endpoint(), methods=["GET", "POST", "DELETE"], include_in_schema=False))


@router.get(METADATA_PATH, include_in_schema=False)
async def resource_metadata(services: ServicesDep) -> dict[str, Any]:
    """RFC 9728 metadata for /mcp. Keys are fluxserve's own (`fluxserve keys create`), sent as a Bearer
    header; the SDK's model wants an authorization server, and this server is the one that issues them."""
    base = services.settings.base_url
    doc = ProtectedResourceMetadata.model_validate(
        {"resource": f"{base}{PATH}", "authorization_servers": [base], "resource_name": "fluxserve"}
    )
    return doc.model_dump(mode="json", exclude_none=True)


@asynccontextmanager
async def lifespan(app: FastAPI, services: Services) -> AsyncIterator[None]:
    app.state.mcp = tools = McpTools(services)
    async with tools.manager.run():
        yield


DIALECT = Dialect(
    "mcp",
    (router,),
    lambda path: path in (PATH, METADATA_PATH),
    render_error,
    body_limit=lambda path: IMAGE_JSON_BODY_BYTES,
    lifespan=lifespan,
)
