"""The official MCP Python SDK's client against the real server: over Streamable HTTP at /mcp, and over stdio
through `fluxserve mcp --base URL`."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import mcp.types as mt
import pytest
from mcp import Client, StdioServerParameters
from PIL import Image

from fluxserve.models import ModelRegistry
from tests.e2e.conftest import E2E_KEY
from tests.support import mcp_client
from tests.support.server import FLUXSERVE, RemoteServer

TOOLS = {"generate_image", "edit_image", "get_task", "cancel_task", "list_models"}
Progress = list[tuple[float, float | None, str | None]]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> Iterator[RemoteServer]:
    # Each denoising step takes 0.1 s: a 40-step job outlives a short wait, and shows its steps as progress.
    env = {"FLUXSERVE_DEMO_STEP_DELAY_S": "0.1"}
    with RemoteServer(tmp_path_factory.mktemp("mcp"), api_key=E2E_KEY, demo_model=demo_model_dir, env=env) as srv:
        yield srv


def over_http(
    server: RemoteServer, work: Callable[[Client], Awaitable[Any]], key: str = E2E_KEY, mode: str = "auto"
) -> Any:
    return mcp_client.over_http(server.url, key, work, mode=mode)


def over_stdio(server: RemoteServer, work: Callable[[Client], Awaitable[Any]]) -> Any:
    env = {**os.environ, "FLUXSERVE_API_KEY": E2E_KEY}
    params = StdioServerParameters(
        command=str(Path(sys.executable).parent / "fluxserve"), args=["mcp", "--base", server.url], env=env
    )

    async def main() -> Any:
        async with Client(params) as client:
            return await work(client)

    return anyio.run(main)


def images_of(result: mt.CallToolResult) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(c.data))) for c in result.content if isinstance(c, mt.ImageContent)]


@pytest.mark.parametrize("mode", ["auto", "legacy"])
def test_tools_are_listed_with_the_registrys_models_and_limits(server: RemoteServer, mode: str) -> None:
    listed = over_http(server, lambda c: c.list_tools(), mode=mode)
    tools = {t.name: t for t in listed.tools}
    assert set(tools) == TOOLS
    schema = tools["generate_image"].input_schema
    registry = ModelRegistry.demo(Path("unused"))
    assert schema["properties"]["model"]["enum"] == registry.names
    assert schema["properties"]["steps"]["maximum"] == max(m.max_steps for m in registry)
    assert schema["required"] == ["prompt"]
    assert tools["edit_image"].input_schema["properties"]["images"]["maxItems"] == 16  # Kontext's


@pytest.mark.parametrize("mode", ["auto", "legacy"])
def test_generate_returns_the_image_a_link_to_it_and_progress(server: RemoteServer, mode: str) -> None:
    progress: Progress = []

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        progress.append((done, total, message))

    args = {"prompt": "a red fox", "model": "flux", "size": "512x384", "seed": 7, "output_format": "jpeg"}
    result = over_http(server, lambda c: c.call_tool("generate_image", args, progress_callback=on_progress), mode=mode)
    assert not result.is_error, result.content
    (image,) = images_of(result)
    assert image.format == "JPEG" and image.size == (512, 384)
    (link,) = [c for c in result.content if isinstance(c, mt.ResourceLink)]
    assert link.mime_type == "image/jpeg"
    fetched = httpx.get(str(link.uri), timeout=30)
    assert fetched.status_code == 200 and Image.open(io.BytesIO(fetched.content)).size == (512, 384)
    task = result.structured_content
    assert task["status"] == "succeeded" and task["images"][0]["seed"] == 7 and task["size"] == "512x384"
    assert progress and progress[-1][0] == progress[-1][1] == 4  # flux (schnell): 4 steps, the last reported
    assert [p[0] for p in progress] == sorted(p[0] for p in progress)


def test_edit_with_two_references_from_a_data_url_and_an_uploaded_file(server: RemoteServer) -> None:
    def png(color: str, size: tuple[int, int]) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", size, color).save(buf, format="PNG")
        return buf.getvalue()

    uploaded = httpx.post(
        f"{server.url}/v1/files",
        files={"content": ("b.png", png("blue", (512, 512)), "image/png")},
        headers=server.headers,
    )
    assert uploaded.status_code == 201, uploaded.text
    # Noise: a PNG of about 6 MB, past the SDK's default body limit of 4 MB.
    noise = Image.frombytes("RGB", (1536, 1024), os.urandom(1536 * 1024 * 3))
    buf = io.BytesIO()
    noise.save(buf, format="PNG", compress_level=1)
    assert buf.tell() > 4 * 1024 * 1024
    data_url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    args = {"prompt": "combine them", "images": [data_url, uploaded.json()["id"]], "model": "flux-kontext-pro"}
    args |= {"steps": 2}
    result = over_http(server, lambda c: c.call_tool("edit_image", args))
    assert not result.is_error, result.content
    (image,) = images_of(result)
    assert image.size == (1248, 832)  # the first reference's 3:2 at about a megapixel
    assert result.structured_content["model"] == "flux-kontext-pro"


def test_a_long_job_answers_with_its_task_id_and_get_task_follows_it_to_the_end(server: RemoteServer) -> None:
    async def work(client: Client) -> tuple[mt.CallToolResult, list[mt.CallToolResult]]:
        args = {"prompt": "slow", "model": "flux-dev", "steps": 30, "size": "256x256", "wait_s": 0.5}
        first = await client.call_tool("generate_image", args)
        polls = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            polls.append(await client.call_tool("get_task", {"id": first.structured_content["id"], "wait_s": 1}))
            if polls[-1].structured_content["status"] == "succeeded":
                break
        return first, polls

    first, polls = over_http(server, work)
    assert not first.is_error
    assert first.structured_content["status"] in ("queued", "processing") and not images_of(first)
    text = first.content[0]
    assert isinstance(text, mt.TextContent) and "get_task" in text.text and first.structured_content["id"] in text.text
    assert polls[-1].structured_content["status"] == "succeeded"
    assert [im.size for im in images_of(polls[-1])] == [(256, 256)]
    assert len(polls) >= 2  # it was seen running between the first answer and the end


def test_cancel_task(server: RemoteServer) -> None:
    async def work(client: Client) -> list[mt.CallToolResult]:
        args = {"prompt": "never mind", "model": "flux-dev", "steps": 50, "size": "256x256", "wait_s": 0}
        first = await client.call_tool("generate_image", args)
        task_id = first.structured_content["id"]
        canceled = await client.call_tool("cancel_task", {"id": task_id})
        return [first, canceled, await client.call_tool("get_task", {"id": task_id, "wait_s": 30})]

    first, canceled, final = over_http(server, work)
    assert first.structured_content["status"] in ("queued", "processing")
    assert not canceled.is_error and canceled.structured_content["id"] == first.structured_content["id"]
    assert final.structured_content["status"] == "canceled" and not images_of(final)
    assert not final.is_error  # get_task answered; the task is what was canceled


@pytest.mark.parametrize(
    ("tool", "args", "param"),
    [
        ("generate_image", {"prompt": "x", "size": "1000x1000"}, "size"),
        ("generate_image", {"prompt": "x", "model": "nope"}, "model"),
        ("generate_image", {"prompt": "x", "n": 11}, "n"),
        ("generate_image", {"prompt": "x", "colour": "red"}, "colour"),
        ("generate_image", {"prompt": "x", "model": "flux-dev", "steps": 500}, "steps"),
        ("generate_image", {"prompt": "x", "size": "512x512", "aspect_ratio": "1:1"}, "aspect_ratio"),
        ("edit_image", {"prompt": "x", "images": ["data:image/png;base64,AAAA"]}, "images[0]"),
        ("edit_image", {"prompt": "x", "images": []}, "images"),
        ("get_task", {"id": "no-such-task"}, "id"),
    ],
)
def test_bad_arguments_are_tool_errors_naming_the_argument(
    server: RemoteServer, tool: str, args: dict[str, Any], param: str
) -> None:
    result = over_http(server, lambda c: c.call_tool(tool, args))
    assert result.is_error
    error = result.structured_content["error"]
    assert error["param"] == param or (param == "id" and error["code"] == "not_found"), error
    assert isinstance(result.content[0], mt.TextContent) and result.content[0].text


def test_no_key_is_a_401_with_the_resource_metadata(server: RemoteServer) -> None:
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    resp = httpx.post(f"{server.url}/mcp", json=body, headers={"Accept": "application/json, text/event-stream"})
    assert resp.status_code == 401
    challenge = resp.headers["www-authenticate"]
    metadata_url = f"{server.url}/.well-known/oauth-protected-resource/mcp"
    assert challenge.startswith("Bearer ") and f'resource_metadata="{metadata_url}"' in challenge
    assert resp.json()["error"]["data"]["code"] == "missing_api_key"
    metadata = httpx.get(metadata_url).json()
    assert metadata["resource"] == f"{server.url}/mcp" and metadata["bearer_methods_supported"] == ["header"]
    wrong = httpx.post(f"{server.url}/mcp", json=body, headers={"Authorization": "Bearer wrong"})
    assert wrong.status_code == 401
    with pytest.raises(Exception):  # noqa: B017 - the SDK's own error for a 401, whatever its class
        over_http(server, lambda c: c.list_tools(), key="wrong")


def test_the_stdio_bridge_lists_generates_and_passes_progress_on(server: RemoteServer) -> None:
    progress: Progress = []

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        progress.append((done, total, message))

    async def work(client: Client) -> tuple[mt.ListToolsResult, mt.CallToolResult]:
        listed = await client.list_tools()
        args = {"prompt": "a boat", "size": "256x256", "seed": 3}
        return listed, await client.call_tool("generate_image", args, progress_callback=on_progress)

    listed, result = over_stdio(server, work)
    assert {t.name for t in listed.tools} == TOOLS
    assert not result.is_error, result.content
    assert [im.size for im in images_of(result)] == [(256, 256)]
    assert progress and progress[-1][0] == 4


def test_a_keys_limits_apply_to_its_tool_calls(server: RemoteServer) -> None:
    created = subprocess.run(
        [FLUXSERVE, "keys", "create", "--name", "agent", "--rpm", "1", "--data-dir", str(server.data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    args = {"prompt": "once a minute", "size": "256x256", "steps": 1}

    async def work(client: Client) -> tuple[mt.CallToolResult, mt.CallToolResult]:
        return await client.call_tool("generate_image", args), await client.call_tool("generate_image", args)

    first, second = over_http(server, work, key=key)
    assert not first.is_error and images_of(first)
    assert second.is_error and second.structured_content["error"]["code"] == "rate_limit_exceeded"
    assert second.structured_content["error"]["retry_after"] > 0
    # The jobs are the new key's own: the operator's key does not see them.
    hidden = over_http(server, lambda c: c.call_tool("get_task", {"id": first.structured_content["id"]}))
    assert hidden.is_error and hidden.structured_content["error"]["code"] == "not_found"
