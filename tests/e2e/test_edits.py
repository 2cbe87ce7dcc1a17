"""Image inputs end to end: the seed's edit curl, the openai SDK, masks, variations, JSON inputs."""

import base64
import io
import json
import subprocess
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from tests.support.image_server import image_server
from tests.support.images_util import bomb_png, mask_png, png_bytes
from tests.support.server import RemoteServer


@pytest.fixture(scope="module")
def client(server: RemoteServer) -> openai.OpenAI:
    return openai.OpenAI(api_key=server.api_key, base_url=f"{server.url}/v1", max_retries=0, timeout=180)


def _img(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def test_seed_edit_curl(server: RemoteServer, tmp_path: Path) -> None:
    lotion = tmp_path / "body-lotion.png"
    lotion.write_bytes(png_bytes((384, 512), (230, 220, 200)))
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
            "model=flux-kontext-pro",
            "-F",
            "image[]=@body-lotion.png",
            "-F",
            'prompt=Generate a photorealistic image of a gift basket on a white background labeled "Relax & Unwind" '
            "with a ribbon and handwriting-like font, containing all the items in the reference pictures",
        ],
        capture_output=True,
        cwd=tmp_path,
        timeout=180,
        check=True,
    )
    body = json.loads(out.stdout)
    assert len(body["data"]) == 1 and body["data"][0]["revised_prompt"].startswith("Generate a photorealistic")
    img = _img(httpx.get(body["data"][0]["url"], timeout=30).content)
    assert img.size == (880, 1184)  # 3:4 like the reference, about 1 MP
    assert body["size"] == "880x1184"


def test_sdk_edit_one_file_and_a_list(client: openai.OpenAI) -> None:
    one = client.images.edit(
        model="flux-kontext-pro",
        image=("a.png", png_bytes((512, 512)), "image/png"),
        prompt="make it blue",
        size="512x512",
        response_format="b64_json",  # type: ignore[arg-type]
    )
    assert one.data is not None and _img(base64.b64decode(one.data[0].b64_json or "")).size == (512, 512)
    two = client.images.edit(
        model="flux-kontext-max",
        image=[
            ("a.png", png_bytes((512, 256), (200, 0, 0)), "image/png"),
            ("b.png", png_bytes((256, 256)), "image/png"),
        ],
        prompt="both items together",
        size="512x256",
        n=2,
        response_format="b64_json",  # type: ignore[arg-type]
    )
    assert two.data is not None and len(two.data) == 2
    assert [_img(base64.b64decode(d.b64_json or "")).size for d in two.data] == [(512, 256)] * 2


def test_sdk_mask_inpainting_and_variation(client: openai.OpenAI) -> None:
    filled = client.images.edit(
        model="flux-fill",
        image=("room.png", png_bytes((256, 256)), "image/png"),
        mask=("mask.png", mask_png((256, 256), (64, 64, 192, 192)), "image/png"),
        prompt="a cat on the sofa",
        size="256x256",
        response_format="b64_json",  # type: ignore[arg-type]
    )
    assert filled.data is not None and _img(base64.b64decode(filled.data[0].b64_json or "")).size == (256, 256)
    with pytest.raises(openai.BadRequestError) as err:
        client.images.edit(
            model="flux-fill",
            image=("room.png", png_bytes((256, 256)), "image/png"),
            mask=("mask.png", mask_png((128, 128), (0, 0, 8, 8)), "image/png"),
            prompt="x",
        )
    assert err.value.code == "invalid_mask_size"
    with pytest.deprecated_call():  # the SDK marks variations deprecated; the route still serves them
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
        json={
            "model": "flux-kontext-pro",
            "input": {
                "prompt": "p",
                "input_image": data_url,
                "megapixels": "0.25",
                "aspect_ratio": "match_input_image",
                "output_format": "png",
            },
        },
        headers=server.headers,
    )
    assert resp.status_code == 200, resp.text
    feed = server.wait_feed(resp.json()["id"])
    assert feed["status"] == "succeeded", feed
    assert feed["input"]["input_image"] == data_url
    assert _img(httpx.get(feed["output"][0]).content).size == (720, 368)


HOSTILE_UPLOADS = [
    ("zero-byte", {"image[]": ("z.png", b"", "image/png")}, 400, "image", "invalid_image_file"),
    ("truncated", {"image[]": ("t.png", png_bytes((64, 64))[:80], "image/png")}, 400, "image", "invalid_image_file"),
    ("text-as-png", {"image[]": ("t.png", b"hello there", "image/png")}, 400, "image", "invalid_image_file"),
    ("tiff", {"image[]": ("t.tif", b"II*\x00" + b"\x00" * 64, "image/tiff")}, 400, "image", "invalid_image_file"),
    ("bomb", {"image[]": ("b.png", bomb_png(), "image/png")}, 400, "image", "image_too_large"),
    (
        "big-mask",
        {
            "image": ("a.png", png_bytes((64, 64)), "image/png"),
            "mask": ("m.png", b"\x89PNG" + b"\x00" * (4 * 1024 * 1024 + 10), "image/png"),
        },
        413,
        "mask",
        "image_too_large",
    ),
    (
        "mask-size",
        {
            "image": ("a.png", png_bytes((64, 64)), "image/png"),
            "mask": ("m.png", mask_png((32, 32), (0, 0, 4, 4)), "image/png"),
        },
        400,
        "mask",
        "invalid_mask_size",
    ),
]


@pytest.mark.parametrize(("name", "files", "status", "param", "code"), HOSTILE_UPLOADS)
def test_hostile_uploads(server: RemoteServer, name: str, files: dict, status: int, param: str, code: str) -> None:  # type: ignore[type-arg]
    resp = httpx.post(f"{server.url}/v1/images/edits", data={"prompt": "p"}, files=files, headers=server.headers)
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["param"] == param and resp.json()["error"]["code"] == code


def test_seventeen_images_and_a_huge_one(server: RemoteServer) -> None:
    many = [("image[]", (f"{i}.png", png_bytes(), "image/png")) for i in range(17)]
    resp = httpx.post(f"{server.url}/v1/images/edits", data={"prompt": "p"}, files=many, headers=server.headers)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "too_many_images"
    huge = {"image": ("h.png", b"\x89PNG" + b"\x00" * (50 * 1024 * 1024 + 10), "image/png")}
    resp = httpx.post(
        f"{server.url}/v1/images/edits", data={"prompt": "p"}, files=huge, headers=server.headers, timeout=60
    )
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "image_too_large"


def test_url_inputs_against_a_server_that_allows_private_hosts(
    tmp_path: Path, demo_model_dir: Path, server: RemoteServer
) -> None:
    with image_server() as base:
        refused = httpx.post(
            f"{server.url}/vmodel/generate",
            json={"model": "flux-dev", "input": {"prompt": "p", "image": f"{base}/cat.png"}},
            headers=server.headers,
        )
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_image_url"
        srv = RemoteServer(
            tmp_path / "lan", api_key="k", demo_model=demo_model_dir, extra_args=("--allow-private-urls",)
        )
        with srv:
            for inp in (
                {"image": f"{base}/redirect", "num_inference_steps": 2, "prompt_strength": 0.5},
                {"input_image": f"{base}/cat.png", "num_inference_steps": 2},
            ):
                model = "flux-dev" if "image" in inp else "flux-kontext-pro"
                resp = httpx.post(
                    f"{srv.url}/vmodel/generate",
                    json={"model": model, "input": {"prompt": "p", **inp}},
                    headers=srv.headers,
                )
                assert resp.status_code == 200, resp.text
                feed = srv.wait_feed(resp.json()["id"])
                assert feed["status"] == "succeeded", feed
                assert _img(httpx.get(feed["output"][0]).content).size == (1248, 832)  # the 3:2 input's aspect
            resp = httpx.post(
                f"{srv.url}/vmodel/generate",
                json={"model": "flux-dev", "input": {"prompt": "p", "image": f"{base}/notes.txt"}},
                headers=srv.headers,
            )
            assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_image_file"


def test_sdk_edit_stream_sends_partial_images_then_the_edit(client: openai.OpenAI) -> None:
    # Before, edits ignored stream: true and answered plain JSON; the SDK then yielded no event at all.
    stream = client.images.edit(
        model="flux-kontext-pro",
        image=[("a.png", png_bytes((512, 512)), "image/png"), ("b.png", png_bytes((384, 384)), "image/png")],
        prompt="stream the edit",
        size="512x512",
        stream=True,
        partial_images=2,
        extra_body={"steps": 6},
    )
    events = list(stream)
    assert [e.type for e in events] == ["image_edit.partial_image"] * 2 + ["image_edit.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]  # type: ignore[union-attr]
    final = Image.open(io.BytesIO(base64.b64decode(events[-1].b64_json)))
    assert final.size == (512, 512) and events[-1].size == "512x512"
