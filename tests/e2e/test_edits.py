"""Image inputs end to end: the seed's edit curl, the openai SDK, masks, variations, JSON inputs."""

import base64
import io
import json
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from tests.e2e.server import RemoteServer
from tests.images_util import mask_png, png_bytes


@pytest.fixture(scope="module")
def client(server: RemoteServer) -> openai.OpenAI:
    return openai.OpenAI(api_key=server.api_key, base_url=f"{server.url}/v1", max_retries=0, timeout=180)


def _img(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def test_seed_edit_curl(server: RemoteServer, tmp_path: Path) -> None:
    lotion = tmp_path / "body-lotion.png"
    lotion.write_bytes(png_bytes((384, 512), (230, 220, 200)))
    out = subprocess.run(
        ["curl", "-sS", "--fail-with-body", "-X", "POST", f"{server.url}/v1/images/edits",
         "-H", f"Authorization: Bearer {server.api_key}",
         "-F", "model=flux-kontext-pro",
         "-F", "image[]=@body-lotion.png",
         "-F", 'prompt=Generate a photorealistic image of a gift basket on a white background labeled "Relax & Unwind" '
               "with a ribbon and handwriting-like font, containing all the items in the reference pictures"],
        capture_output=True, cwd=tmp_path, timeout=180, check=True,
    )  # fmt: skip
    body = json.loads(out.stdout)
    assert len(body["data"]) == 1 and body["data"][0]["revised_prompt"].startswith("Generate a photorealistic")
    img = _img(httpx.get(body["data"][0]["url"], timeout=30).content)
    assert img.size == (880, 1184)  # 3:4 like the reference, about 1 MP
    assert body["size"] == "880x1184"


def test_sdk_edit_one_file_and_a_list(client: openai.OpenAI) -> None:
    one = client.images.edit(
        model="flux-kontext-pro", image=("a.png", png_bytes((512, 512)), "image/png"), prompt="make it blue",
        size="512x512", response_format="b64_json",  # type: ignore[arg-type]
    )  # fmt: skip
    assert one.data is not None and _img(base64.b64decode(one.data[0].b64_json or "")).size == (512, 512)
    two = client.images.edit(
        model="flux-kontext-max",
        image=[("a.png", png_bytes((512, 256), (200, 0, 0)), "image/png"),
               ("b.png", png_bytes((256, 256)), "image/png")],
        prompt="both items together", size="512x256", n=2, response_format="b64_json",  # type: ignore[arg-type]
    )  # fmt: skip
    assert two.data is not None and len(two.data) == 2
    assert [_img(base64.b64decode(d.b64_json or "")).size for d in two.data] == [(512, 256)] * 2


def test_sdk_mask_inpainting_and_variation(client: openai.OpenAI) -> None:
    filled = client.images.edit(
        model="flux-fill", image=("room.png", png_bytes((256, 256)), "image/png"),
        mask=("mask.png", mask_png((256, 256), (64, 64, 192, 192)), "image/png"),
        prompt="a cat on the sofa", size="256x256", response_format="b64_json",  # type: ignore[arg-type]
    )  # fmt: skip
    assert filled.data is not None and _img(base64.b64decode(filled.data[0].b64_json or "")).size == (256, 256)
    with pytest.raises(openai.BadRequestError) as err:
        client.images.edit(
            model="flux-fill", image=("room.png", png_bytes((256, 256)), "image/png"),
            mask=("mask.png", mask_png((128, 128), (0, 0, 8, 8)), "image/png"), prompt="x",
        )  # fmt: skip
    assert err.value.code == "invalid_mask_size"
    variations = client.images.create_variation(
        image=("v.png", png_bytes((256, 256)), "image/png"), n=2, size="256x256", response_format="b64_json"
    )
    assert variations.data is not None and len(variations.data) == 2


def test_sdk_hostile_upload(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.images.edit(model="flux-kontext-pro", image=("x.png", b"not an image", "image/png"), prompt="x")
    assert err.value.code == "invalid_image_file"


def test_vmodel_json_image_input(server: RemoteServer) -> None:
    data_url = "data:image/png;base64," + base64.b64encode(png_bytes((512, 256))).decode()
    resp = httpx.post(
        f"{server.url}/vmodel/generate",
        json={"model": "flux-kontext-pro", "input": {"prompt": "p", "input_image": data_url, "megapixels": "0.25",
                                                     "aspect_ratio": "match_input_image", "output_format": "png"}},
        headers=server.headers,
    )  # fmt: skip
    assert resp.status_code == 200, resp.text
    deadline = time.time() + 120
    while time.time() < deadline:
        feed = httpx.get(f"{server.url}/vmodel/feed/{resp.json()['id']}", headers=server.headers).json()
        if feed["status"] in ("succeeded", "failed"):
            break
        time.sleep(0.2)
    assert feed["status"] == "succeeded", feed
    assert feed["input"]["input_image"] == data_url
    assert _img(httpx.get(feed["output"][0]).content).size == (720, 368)
