"""The seed's curl examples, verbatim but for host and key, against the real server."""

import base64
import io
import json
import subprocess
import time

from PIL import Image

from tests.support.server import RemoteServer


def curl(*args: str) -> dict:  # type: ignore[type-arg]
    out = subprocess.run(["curl", "-sS", "--fail-with-body", *args], capture_output=True, check=True, timeout=120)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def curl_bytes(url: str) -> bytes:
    return subprocess.run(["curl", "-sS", "--fail", url], capture_output=True, check=True, timeout=60).stdout


def test_seed_generations_curl(server: RemoteServer) -> None:
    body = curl(
        f"{server.url}/v1/images/generations",
        "-H",
        f"Authorization: Bearer {server.api_key}",
        "-H",
        "Content-Type: application/json",
        "-d",
        """{
    "model": "flux",
    "prompt": "a white siamese cat",
    "n": 1,
    "size": "1024x1024"
  }""",
    )
    assert len(body["data"]) == 1
    assert body["data"][0]["revised_prompt"] == "a white siamese cat"
    img = Image.open(io.BytesIO(curl_bytes(body["data"][0]["url"])))
    assert img.format == "PNG" and img.size == (1024, 1024)


def test_seed_task_api_curl(server: RemoteServer) -> None:
    created = curl(
        "--request",
        "POST",
        "--url",
        f"{server.url}/vmodel/generate",
        "--header",
        f"Authorization: Bearer {server.api_key}",
        "--header",
        "Content-Type: application/json",
        "--data",
        """{
    "model":"flux-schnell",
    "input": {
      "prompt": "空气",
      "num_outputs": 1,
      "aspect_ratio": "1:1",
      "output_format": "jpg",
      "output_quality": 80,
      "seed": 1900004
    }
  }""",
    )
    assert list(created) == ["id"]
    statuses = []
    deadline = time.time() + 60
    while time.time() < deadline:
        feed = curl(f"{server.url}/vmodel/feed/{created['id']}", "--header", f"Authorization: Bearer {server.api_key}")
        statuses.append(feed["status"])
        if feed["status"] in ("succeeded", "failed"):
            break
        time.sleep(0.1)
    assert feed["status"] == "succeeded", feed
    assert set(statuses) <= {"starting", "processing", "succeeded"}
    # The seed's documented fields, with the seed's values.
    assert feed["id"] == created["id"] and feed["model"] == "flux-schnell" and feed["error"] is None
    assert feed["input"] == {
        "aspect_ratio": "1:1",
        "num_outputs": 1,
        "output_format": "jpg",
        "output_quality": 80,
        "prompt": "空气",
        "seed": 1900004,
    }
    [url] = feed["output"]
    assert url.startswith(server.url) and url.split("?")[0].endswith("/out-0.jpg")
    img = Image.open(io.BytesIO(curl_bytes(url)))
    assert img.format == "JPEG" and img.size == (1024, 1024)


def test_provider_prefixes_a1111_and_async_with_curl(server: RemoteServer) -> None:
    """The docs' curl lines (clients/more-dialects.md) for the relay's prefixes, OpenAI async mode and A1111,
    against the real server."""
    auth = f"Authorization: Bearer {server.api_key}"
    json_body = "Content-Type: application/json"
    created = curl(
        "--url",
        f"{server.url}/bfl/v1/flux-kontext-pro",
        "--header",
        auth,
        "--header",
        json_body,
        "--data",
        '{"prompt": "a red fox", "aspect_ratio": "1:1"}',
    )
    deadline = time.time() + 60
    while (got := curl(f"{server.url}/bfl/v1/get_result?id={created['id']}", "--header", f"x-key: {server.api_key}"))[
        "status"
    ] == "Pending" and time.time() < deadline:
        time.sleep(0.2)
    assert got["status"] == "Ready" and Image.open(io.BytesIO(curl_bytes(got["result"]["sample"]))).size == (1024, 1024)
    pred = curl(
        "--url",
        f"{server.url}/replicate/v1/models/black-forest-labs/flux-schnell/predictions",
        "--header",
        auth,
        "--header",
        "Prefer: wait",
        "--header",
        "Content-Type: application/json",
        "--data",
        '{"input": {"prompt": "a fox", "megapixels": "0.25"}}',
    )
    assert pred["status"] == "succeeded" and len(pred["output"]) == 1
    task = curl(
        "--url",
        f"{server.url}/v1/images/generations",
        "--header",
        auth,
        "--header",
        "Content-Type: application/json",
        "--data",
        '{"model": "flux-schnell", "prompt": "a fox", "size": "256x256", "async": true}',
    )
    assert task["status"] in ("queued", "in_progress", "completed")
    deadline = time.time() + 60
    while (done := curl(f"{server.url}/v1/images/tasks/{task['task_id']}", "--header", auth))["status"] != "completed":
        assert time.time() < deadline and done["status"] in ("queued", "in_progress"), done
        time.sleep(0.2)
    assert done["data"][0]["url"].startswith(server.url)
    txt2img = '{"prompt": "a fox", "width": 768, "height": 512, "steps": 4, "batch_size": 2, "seed": 5}'
    a1111 = curl(
        "--url",
        f"{server.url}/sdapi/v1/txt2img",
        "-u",
        f"webui:{server.api_key}",
        "--header",
        json_body,
        "--data",
        txt2img,
    )
    assert json.loads(a1111["info"])["all_seeds"] == [5, 6]
    assert Image.open(io.BytesIO(base64.b64decode(a1111["images"][1]))).size == (768, 512)
