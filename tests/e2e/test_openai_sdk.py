"""The `openai` Python SDK pointed at the real server."""

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from fluxserve.models import ModelRegistry
from tests.support.server import RemoteServer


@pytest.fixture(scope="module")
def client(server: RemoteServer) -> openai.OpenAI:
    return openai.OpenAI(api_key=server.api_key, base_url=f"{server.url}/v1", max_retries=0, timeout=120)


def test_generate_url(client: openai.OpenAI) -> None:
    result = client.images.generate(model="flux-schnell", prompt="a red fox", size="1024x1024")
    assert result.data is not None and len(result.data) == 1
    assert result.data[0].revised_prompt == "a red fox"
    png = httpx.get(result.data[0].url or "", timeout=30)
    assert Image.open(io.BytesIO(png.content)).size == (1024, 1024)


def test_generate_b64_n2_non_square(client: openai.OpenAI) -> None:
    result = client.images.generate(
        model="flux", prompt="a lighthouse", n=2, size="1792x1024", response_format="b64_json"
    )
    assert result.data is not None and len(result.data) == 2
    images = [Image.open(io.BytesIO(base64.b64decode(d.b64_json or ""))) for d in result.data]
    assert [im.size for im in images] == [(1792, 1024), (1792, 1024)]
    assert images[0].tobytes() != images[1].tobytes()  # each image has its own seed


def test_generate_with_gpt_image_fields(client: openai.OpenAI) -> None:
    result = client.images.generate(
        model="flux",
        prompt="a teapot",
        size="512x768",  # type: ignore[arg-type]
        quality="high",
        output_format="jpeg",
        output_compression=60,
        user="someone",
        response_format="b64_json",
    )
    assert result.data is not None
    img = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json or "")))
    assert img.format == "JPEG" and img.size == (512, 768)


def test_sdk_errors(client: openai.OpenAI, server: RemoteServer) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(model="flux", prompt="x", size="1000x1000")  # type: ignore[arg-type]
    assert err.value.param == "size"  # type: ignore[attr-defined]
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(model="nope", prompt="x")
    assert err.value.code == "model_not_found"
    bad = openai.OpenAI(api_key="wrong", base_url=f"{server.url}/v1", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.images.generate(model="flux", prompt="x")


def test_models_list(client: openai.OpenAI) -> None:
    from fluxserve.models.demo import demo_kinds

    names = [m.id for m in client.models.list()]
    # The demo serves every default name it can build here (FLUX 3's need torchvision: tests/engine/test_flux3.py).
    assert names == [m.name for m in ModelRegistry.default() if m.kind in demo_kinds()]
    assert all(m.owned_by == "fluxserve-demo" for m in client.models.list())


def test_client_that_gives_up_frees_the_worker(server: RemoteServer) -> None:

    body = {"model": "flux-dev", "prompt": "a long one", "size": "2048x2048", "steps": 50}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/images/generations", json=body, headers=server.headers, timeout=1.5)
    resp = httpx.post(
        f"{server.url}/vmodel/generate",
        json={"model": "flux-schnell", "input": {"prompt": "next", "megapixels": "0.25"}},
        headers=server.headers,
    )
    feed = server.wait_feed(resp.json()["id"])
    assert feed["status"] == "succeeded"
    # The abandoned job was canceled, not run to the end of its 50 steps.
    import sqlite3

    db = sqlite3.connect(server.data_dir / "fluxserve.db")
    status, done = db.execute(
        "SELECT status, progress_done FROM jobs WHERE dialect = 'openai' AND spec LIKE '%a long one%'"
    ).fetchone()
    db.close()
    assert status == "canceled" and done < 50, (status, done)


def test_a_client_with_an_idempotency_key_that_leaves_stops_the_wait_not_the_job(server: RemoteServer) -> None:
    import sqlite3
    import time

    body = {"model": "flux-dev", "prompt": "keyed and left", "size": "1024x1024", "steps": 30}
    headers = {**server.headers, "Idempotency-Key": "left-once"}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/images/generations", json=body, headers=headers, timeout=1.0)
    left = time.monotonic()
    # The request ends (499 in the log) within a couple of polls, long before its job does.
    while "POST /v1/images/generations 499" not in server.log():
        assert time.monotonic() - left < 10, "the abandoned request kept waiting"
        time.sleep(0.2)
    db = sqlite3.connect(server.data_dir / "fluxserve.db")
    status = db.execute("SELECT status FROM jobs WHERE idempotency_key = 'left-once'").fetchone()[0]
    db.close()
    assert status in ("queued", "processing", "succeeded")  # shared through its key: it runs on
    again = httpx.post(f"{server.url}/v1/images/generations", json=body, headers=headers, timeout=120)
    assert again.status_code == 200 and again.json()["data"]  # the retry gets the same job's images


def test_content_provenance_checks_and_fluxserve_verify(
    client: openai.OpenAI, server: RemoteServer, tmp_path: Path
) -> None:
    """Issue 37: the SDK's client.content_provenance_checks.create reads our marks on a demo image; the CLI's
    `fluxserve verify` says the same from the operator's side, naming the job, and exits 1 on a foreign file."""
    result = client.images.generate(
        model="flux-schnell", prompt="a red fox", size="512x512", output_format="jpeg", response_format="b64_json"
    )
    assert result.data is not None
    data = base64.b64decode(result.data[0].b64_json or "")
    check = client.content_provenance_checks.create(file=("fox.jpg", data, "image/jpeg"))
    assert check.object == "content_provenance_check"
    c2pa = next(r for r in check.results if r.type == "c2pa")
    assert c2pa.outcome == "detected" and c2pa.validation_state == "valid"
    assert c2pa.model == "flux-schnell" and (c2pa.issuer or "").startswith("fluxserve self-signed")
    # Our own result type: the SDK keeps it, with its extra fields (it has no class for it).
    mark = next(r for r in check.results if r.type == "watermark")  # type: ignore[comparison-overlap]
    job = getattr(mark, "job", None)
    assert mark.outcome == "detected" and job
    stripped = io.BytesIO()
    Image.open(io.BytesIO(data)).save(stripped, format="PNG")  # the pixels only: the manifest is gone
    again = client.content_provenance_checks.create(file=("copy.png", stripped.getvalue(), "image/png"))
    assert next(r for r in again.results if r.type == "c2pa").outcome == "not_detected"
    assert getattr(next(r for r in again.results if r.type == "watermark"), "job", None) == job  # type: ignore[comparison-overlap]

    (tmp_path / "fox.jpg").write_bytes(data)
    (tmp_path / "copy.png").write_bytes(stripped.getvalue())
    foreign = io.BytesIO()
    Image.effect_noise((256, 256), 40).convert("RGB").save(foreign, format="PNG")
    (tmp_path / "foreign.png").write_bytes(foreign.getvalue())
    cli = [str(Path(sys.executable).parent / "fluxserve"), "verify", "--data-dir", str(server.data_dir)]
    ok = subprocess.run([*cli, str(tmp_path / "fox.jpg"), str(tmp_path / "copy.png")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count(f"(job {job})") == 2 and "C2PA valid" in ok.stdout
    bad = subprocess.run([*cli, "--json", str(tmp_path / "foreign.png")], capture_output=True, text=True)
    assert bad.returncode == 1 and json.loads(bad.stdout)["marked"] is False
