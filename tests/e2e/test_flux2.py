"""FLUX.2 end to end: the real server on the demo model's klein folder, real clients."""

import base64
import io
import json
import subprocess
import time
from pathlib import Path

import httpx
import openai
from PIL import Image

from tests.support.images_util import png_bytes
from tests.support.server import RemoteServer

SEED_PROMPT = (
    'Generate a photorealistic image of a gift basket on a white background labeled "Relax & Unwind" '
    "with a ribbon and handwriting-like font, containing all the items in the reference pictures"
)


def test_seed_edit_with_several_references_on_klein(server: RemoteServer, tmp_path: Path) -> None:
    """The seed's edit curl, its several image[] parts going natively to FLUX.2 [klein] 4B."""
    for name, size, color in [
        ("body-lotion", (384, 512), (230, 220, 200)),
        ("bath-bomb", (256, 256), (200, 90, 160)),
        ("soap", (320, 256), (90, 160, 200)),
    ]:
        (tmp_path / f"{name}.png").write_bytes(png_bytes(size, color))
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "--fail-with-body",
            "-X",
            "POST",
            f"{server.url}/v1/images/edits",
            "-H",
            f"Authorization: Bearer {server.api_key}",
            "-F",
            "model=flux-2-klein-4b",
            "-F",
            "image[]=@body-lotion.png",
            "-F",
            "image[]=@bath-bomb.png",
            "-F",
            "image[]=@soap.png",
            "-F",
            f"prompt={SEED_PROMPT}",
        ],
        capture_output=True,
        cwd=tmp_path,
        timeout=180,
        check=True,
    )
    body = json.loads(out.stdout)
    img = Image.open(io.BytesIO(httpx.get(body["data"][0]["url"], timeout=30).content))
    assert img.size == (880, 1184) and body["size"] == "880x1184"  # the first reference's 3:4, about 1 MP


def test_sdk_stream_previews_of_flux2(server: RemoteServer) -> None:
    client = openai.OpenAI(api_key=server.api_key, base_url=f"{server.url}/v1", max_retries=0, timeout=120)
    stream = client.images.generate(
        model="flux-2-dev",
        prompt="partials",
        size="512x256",
        stream=True,
        partial_images=2,
        extra_body={"steps": 5},
    )
    events = list(stream)
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    previews = [Image.open(io.BytesIO(base64.b64decode(e.b64_json))) for e in events]
    assert all(p.size == (512, 256) for p in previews)
    assert previews[0].tobytes() != previews[-1].tobytes()


def test_replicate_and_bfl_flux2_on_the_real_engine(server: RemoteServer) -> None:
    ref = "data:image/png;base64," + base64.b64encode(png_bytes((512, 256))).decode()
    resp = httpx.post(
        f"{server.url}/v1/models/black-forest-labs/flux-2-klein-9b/predictions",
        json={
            "input": {
                "prompt": "p",
                "images": [ref, ref],
                "aspect_ratio": "match_input_image",
                "output_megapixels": "0.25",
                "output_format": "png",
            }
        },
        headers={**server.headers, "Prefer": "wait=60"},
        timeout=90,
    )
    assert resp.status_code == 201 and resp.json()["status"] == "succeeded", resp.text
    [url] = resp.json()["output"]
    assert Image.open(io.BytesIO(httpx.get(url, timeout=30).content)).size == (720, 368)
    xkey = {"x-key": server.api_key}
    body = {"prompt": "p", "input_image": ref, "width": 256, "height": 256}
    created = httpx.post(f"{server.url}/v1/flux-2-klein-9b-preview", json=body, headers=xkey).json()
    for _ in range(300):
        result = httpx.get(created["polling_url"], headers=xkey).json()
        if result["status"] != "Pending":
            break
        time.sleep(0.2)
    assert result["status"] == "Ready", result
    img = Image.open(io.BytesIO(httpx.get(result["result"]["sample"]).content))
    assert img.format == "JPEG" and img.size == (256, 256)
