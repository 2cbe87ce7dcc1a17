"""The replicate Python client, BFL polling with httpx, and SSE with httpx-sse, against the real server."""

import base64
import io
import time

import httpx
import httpx_sse
import pytest
import replicate
from PIL import Image
from replicate.exceptions import ReplicateError

from tests.support.images_util import png_bytes
from tests.support.server import RemoteServer


@pytest.fixture(scope="module")
def client(server: RemoteServer) -> replicate.Client:
    return replicate.Client(api_token=server.api_key, base_url=server.url, timeout=120)


def _read(output: object) -> bytes:
    return output.read() if hasattr(output, "read") else httpx.get(str(output), timeout=30).content


def test_run_schnell_and_kontext(client: replicate.Client) -> None:
    out = client.run(
        "black-forest-labs/flux-schnell", input={"prompt": "a fox", "megapixels": "0.25", "num_outputs": 2}
    )
    assert len(out) == 2
    # The client wraps only https URLs in FileOutput; a loopback server hands out http ones.
    img = Image.open(io.BytesIO(_read(out[0])))
    assert img.size == (512, 512) and img.format == "WEBP"
    data_url = "data:image/png;base64," + base64.b64encode(png_bytes((512, 256))).decode()
    single = client.run("black-forest-labs/flux-kontext-pro", input={"prompt": "red", "input_image": data_url})
    assert isinstance(single, str)  # kontext returns one file, not a list
    img = Image.open(io.BytesIO(_read(single)))
    assert img.format == "PNG" and img.size == (1456, 720)


def test_run_with_a_wait_shorter_than_the_job_still_returns_its_output(client: replicate.Client) -> None:
    """run() polls on only when the blocking create says "starting"; "processing" made it return None."""
    out = client.run(
        "black-forest-labs/flux-dev", input={"prompt": "longer than a second", "num_inference_steps": 20}, wait=1
    )
    assert isinstance(out, list) and len(out) == 1, out


def test_create_wait_cancel_list(client: replicate.Client) -> None:
    p = client.models.predictions.create(model="black-forest-labs/flux-schnell", input={"prompt": "wait for me"})
    p.wait()
    assert p.status == "succeeded" and isinstance(p.output, list)
    long = client.models.predictions.create(
        model="black-forest-labs/flux-dev", input={"prompt": "long", "num_inference_steps": 50}
    )
    queued = client.models.predictions.create(model="black-forest-labs/flux-schnell", input={"prompt": "queued"})
    deadline = time.time() + 60
    while long.status != "processing" and time.time() < deadline:
        long.reload()
        time.sleep(0.1)
    queued.cancel()
    long.cancel()
    long.wait()
    queued.reload()
    assert long.status == "canceled" and queued.status == "canceled" and queued.started_at is None
    assert "step 50/50" not in (long.logs or "")  # stopped at its next step, not after all 50
    after = client.models.predictions.create(model="black-forest-labs/flux-schnell", input={"prompt": "after"})
    after.wait()
    assert after.status == "succeeded"  # the cancel freed the worker
    ids = [x.id for x in client.predictions.list().results]
    assert ids[:4] == [after.id, queued.id, long.id, p.id]


def test_client_sees_validation_errors(client: replicate.Client) -> None:
    with pytest.raises(ReplicateError) as err:
        client.models.predictions.create(
            model="black-forest-labs/flux-schnell", input={"prompt": "x", "num_outputs": 9}
        )
    assert err.value.status == 422 and "num_outputs" in str(err.value)


def test_sse_stream(server: RemoteServer) -> None:
    created = httpx.post(
        f"{server.url}/v1/models/black-forest-labs/flux-dev/predictions",
        json={"input": {"prompt": "stream me", "num_inference_steps": 6, "megapixels": "0.25"}},
        headers=server.headers,
    ).json()
    events = []
    with (
        httpx.Client(timeout=120) as http,
        httpx_sse.connect_sse(
            http, "GET", created["urls"]["stream"], headers={**server.headers, "Accept": "text/event-stream"}
        ) as source,
    ):
        events = [(sse.event, sse.data) for sse in source.iter_sse()]
    names = [e for e, _ in events]
    assert names[-1] == "done" and names.count("output") == 1
    assert "step 6/6" in [d for e, d in events if e == "logs"]


def test_replicate_stream_with_the_real_client_and_no_token(client: replicate.Client, server: RemoteServer) -> None:
    # replicate-python drops SSE events without an id: line; replicate-js opens urls.stream with no token.
    events = list(
        client.stream(
            "black-forest-labs/flux-dev",
            input={"prompt": "stream me", "num_inference_steps": 4, "megapixels": "0.25"},
            use_file_output=False,
        )
    )
    kinds = [e.event.value for e in events]
    assert kinds[-1] == "done" and kinds.count("output") == 1 and "logs" in kinds
    assert len({e.id for e in events}) == len(events)  # one id each
    url = next(e.data for e in events if e.event.value == "output")
    assert httpx.get(url, timeout=30).content[:4] == b"RIFF"  # webp
    created = httpx.post(
        f"{server.url}/v1/models/black-forest-labs/flux-schnell/predictions",
        json={"input": {"prompt": "no token", "megapixels": "0.25"}},
        headers=server.headers,
    ).json()
    stream = created["urls"]["stream"]
    with httpx.stream("GET", stream, headers={"Accept": "text/event-stream"}, timeout=60) as resp:
        assert resp.status_code == 200
        body = "".join(resp.iter_text())
    assert "event: done" in body and "id: " in body
    forged = httpx.get(stream.replace("sig=", "sig=0"), timeout=10)
    assert forged.status_code == 403 and forged.json()["status"] == 403  # Replicate's problem shape
    assert httpx.get(stream.split("?")[0], timeout=10).status_code == 401


def test_models_get_versions_and_a_pinned_version_with_the_real_client(client: replicate.Client) -> None:
    model = client.models.get("black-forest-labs/flux-dev")
    assert model.owner == "black-forest-labs" and model.name == "flux-dev" and model.latest_version is not None
    schema = model.latest_version.openapi_schema["components"]["schemas"]
    steps = schema["Input"]["properties"]["num_inference_steps"]
    assert steps["default"] == 28 and steps["maximum"] == 50  # the registry's, not the schema's None
    assert schema["Output"]["type"] == "array"
    versions = list(model.versions.list())
    assert [v.id for v in versions] == [model.latest_version.id]
    assert model.versions.get(model.latest_version.id).id == model.latest_version.id
    pinned = client.run(
        f"black-forest-labs/flux-schnell:{client.models.get('black-forest-labs/flux-schnell').latest_version.id}",
        input={"prompt": "pinned", "megapixels": "0.25"},
    )
    assert len(pinned) == 1
    with pytest.raises(ReplicateError) as err:
        client.models.get("black-forest-labs/no-such-model")
    assert err.value.status == 404 and "not served here" in str(err.value)


def test_bfl_polling(server: RemoteServer) -> None:
    xkey = {"x-key": server.api_key or ""}
    created = httpx.post(
        f"{server.url}/v1/flux-dev", json={"prompt": "bfl", "width": 512, "height": 256, "steps": 4}, headers=xkey
    ).json()
    deadline = time.time() + 60
    while time.time() < deadline:
        result = httpx.get(created["polling_url"], headers=xkey).json()
        if result["status"] != "Pending":
            break
        time.sleep(0.2)
    assert result["status"] == "Ready"
    img = Image.open(io.BytesIO(httpx.get(result["result"]["sample"]).content))
    assert img.format == "JPEG" and img.size == (512, 256)


def test_openai_sdk_streaming_partials(server: RemoteServer) -> None:
    import openai

    client = openai.OpenAI(api_key=server.api_key, base_url=f"{server.url}/v1", max_retries=0, timeout=120)
    stream = client.images.generate(
        model="flux-dev",
        prompt="partials",
        size="512x512",
        stream=True,
        partial_images=2,
        extra_body={"steps": 6},
    )
    events = list(stream)
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    previews = [Image.open(io.BytesIO(base64.b64decode(e.b64_json))) for e in events]
    assert all(p.size == (512, 512) for p in previews)
    assert previews[0].tobytes() != previews[-1].tobytes()


def test_replicate_files_and_the_prefix_with_the_real_client(server: RemoteServer) -> None:
    """replicate-python pointed at /replicate (the relay's prefix): it uploads a file object passed as an
    input through POST /v1/files and sends the file's urls.get, which the prediction reads from our storage."""
    prefixed = replicate.Client(api_token=server.api_key, base_url=f"{server.url}/replicate", timeout=120)
    uploaded = prefixed.files.create(io.BytesIO(png_bytes((256, 128), (200, 10, 10))), filename="ref.png")
    assert uploaded.size > 0 and uploaded.urls["get"] == f"{server.url}/v1/files/{uploaded.id}"
    assert uploaded.checksums["sha256"] and prefixed.files.get(uploaded.id).name == "ref.png"
    assert uploaded.id in [f.id for f in prefixed.files.list()]
    out = prefixed.run(
        "black-forest-labs/flux-kontext-pro",
        input={"prompt": "blue", "input_image": io.BytesIO(png_bytes((256, 128), (0, 0, 200)))},
        file_encoding_strategy="url",
    )
    assert Image.open(io.BytesIO(_read(out))).format == "PNG"
    by_url = prefixed.run(
        "black-forest-labs/flux-kontext-pro", input={"prompt": "green", "input_image": uploaded.urls["get"]}
    )
    assert Image.open(io.BytesIO(_read(by_url))).size == (1456, 720)  # the upload's 2:1, at 1 MP
    other = replicate.Client(api_token="fs-not-the-owner", base_url=server.url)
    with pytest.raises(ReplicateError):
        other.files.get(uploaded.id)
    prefixed.files.delete(uploaded.id)
    with pytest.raises(ReplicateError) as gone:
        prefixed.files.get(uploaded.id)
    assert gone.value.status == 404
