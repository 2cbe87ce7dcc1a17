"""LoRA adapters end to end: the real server with a LoRA folder, the openai SDK, curl, a real browser."""

import base64
import io
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from fluxserve.outputs import read_metadata
from tests.support.server import RemoteServer

KEY = "fs-e2e-lora-key"


@pytest.fixture(scope="module")
def lora_server(
    tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path, lora_dir: Path
) -> Iterator[RemoteServer]:
    # Provenance off: each job's watermark is its own, and these tests compare two jobs' pixels exactly.
    args = ("--lora-dir", str(lora_dir), "--models", "flux-2-klein-4b,flux-dev,flux-schnell", "--provenance", "off")
    with RemoteServer(
        tmp_path_factory.mktemp("lora-server"), api_key=KEY, demo_model=demo_model_dir, extra_args=args
    ) as srv:
        yield srv


def test_sdk_generation_with_adapters_records_them_in_the_image(lora_server: RemoteServer) -> None:
    client = openai.OpenAI(api_key=KEY, base_url=f"{lora_server.url}/v1", max_retries=0, timeout=120)

    def make(loras: list[dict[str, object]] | None) -> bytes:
        extra = {"seed": 3, "loras": loras} if loras is not None else {"seed": 3}
        result = client.images.generate(
            model="flux-2-klein-4b", prompt="a lighthouse", size="256x256", response_format="b64_json", extra_body=extra
        )
        assert result.data is not None
        return base64.b64decode(result.data[0].b64_json or "")

    base = make(None)
    styled = make([{"path": "klein-style", "scale": 0.8}, {"path": "characters/klein-hero", "scale": 0.3}])
    meta = read_metadata(styled)
    assert [(x["source"], x["scale"]) for x in meta["loras"]] == [("klein-style", 0.8), ("characters/klein-hero", 0.3)]  # type: ignore[index,union-attr]
    assert "loras" not in read_metadata(base)
    zero = make([{"path": "klein-style", "scale": 0}])
    assert _pixels(zero) == _pixels(base) != _pixels(styled)  # scale 0 is the base model, pixel for pixel
    with pytest.raises(openai.BadRequestError) as err:
        make([{"path": "flux1-style"}])
    assert "FLUX.1 adapter" in str(err.value) and err.value.body["param"] == "loras[0].path"  # type: ignore[index]


def _pixels(png: bytes) -> bytes:
    return Image.open(io.BytesIO(png)).convert("RGB").tobytes()


def test_replicate_lora_model_with_curl(lora_server: RemoteServer) -> None:
    body = {
        "input": {
            "prompt": "a fox",
            "lora_weights": "flux1-style",
            "lora_scale": 0.9,
            "num_inference_steps": 2,
            "megapixels": "0.25",
            "output_format": "png",
        }
    }
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "--fail-with-body",
            "-X",
            "POST",
            f"{lora_server.url}/v1/models/black-forest-labs/flux-dev-lora/predictions",
            "-H",
            f"Authorization: Bearer {KEY}",
            "-H",
            "Prefer: wait=60",
            "-H",
            "Content-Type: application/json",
            "-d",
            json.dumps(body),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    prediction = json.loads(out.stdout)
    assert prediction["status"] == "succeeded", prediction
    meta = read_metadata(httpx.get(prediction["output"][0], timeout=30).content)
    assert meta["loras"][0]["source"] == "flux1-style" and meta["loras"][0]["scale"] == 0.9  # type: ignore[index]


def test_playground_picks_an_adapter(lora_server: RemoteServer) -> None:
    from playwright.sync_api import expect, sync_playwright

    from tests.e2e.test_playground import ARGS, CHROMIUM, _shot

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(lora_server.url)
        page.fill("#endpoint", lora_server.url)
        page.fill("#api-key", KEY)
        page.click("#settings-form button[type=submit]")
        expect(page.locator("#conn-status")).to_contain_text("Connected")
        page.select_option("#model", "flux-2-klein-4b")
        expect(page.locator("#lora")).to_be_visible()
        # Only adapters for the model's generation can be picked.
        expect(page.locator("#lora option[value='flux1-style']")).to_be_disabled()
        page.select_option("#lora", "klein-style")
        page.fill("#lora-scale", "0.6")
        page.fill("#prompt", "a lighthouse in the adapter's style")
        page.click("#send")
        expect(page.locator(".turn figure").first).to_be_visible(timeout=120_000)
        expect(page.locator(".turn .meta").first).to_contain_text("LoRA klein-style \u00d7 0.6")
        _shot(page, "playground-lora")
        browser.close()
    assert errors == []
