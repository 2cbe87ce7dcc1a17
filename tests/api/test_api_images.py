"""Edits, variations and JSON image inputs over the HTTP and job layers (FakeEngine)."""

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from fluxserve.app import create_app
from fluxserve.settings import Settings
from tests.conftest import AUTH
from tests.support.fakes import FakeEngine
from tests.support.image_server import image_server
from tests.support.images_util import bomb_png, mask_png, png_bytes

EDITS = "/v1/images/edits"


def _err(resp: Any, status: int, param: str | None, code: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err: dict[str, Any] = resp.json()["error"]
    assert err["param"] == param, err
    if code:
        assert err["code"] == code, err
    return err


def test_edit_field_spellings(client: TestClient, fake_engine: FakeEngine) -> None:
    one = [("image", ("a.png", png_bytes((64, 32)), "image/png"))]
    repeated = [*one, ("image", ("b.png", png_bytes(), "image/png"))]
    brackets = [
        ("image[]", ("a.png", png_bytes((64, 32)), "image/png")),
        ("image[]", ("b.png", png_bytes(), "image/png")),
    ]
    for files, count in [(one, 1), (repeated, 2), (brackets, 2)]:
        resp = client.post(EDITS, data={"prompt": "combine", "model": "flux-kontext-pro"}, files=files, headers=AUTH)
        assert resp.status_code == 200, resp.text
        spec = fake_engine.last_spec
        assert spec.task == "kontext" and len(spec.images) == count
        assert (spec.width, spec.height) == (1456, 720)  # the first image's 2:1 at about 1 MP
        assert len(fake_engine.calls[-1][0].images) == count


def test_edit_defaults_and_options(client: TestClient, fake_engine: FakeEngine) -> None:
    files = [("image[]", ("a.png", png_bytes(), "image/png"))]
    data = {"prompt": "p", "n": "2", "size": "512x512", "response_format": "b64_json", "quality": "medium", "x": "1"}
    resp = client.post(EDITS, data=data, files=files, headers=AUTH)
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["data"]) == 2 and "b64_json" in resp.json()["data"][0]
    spec = fake_engine.last_spec
    assert spec.model == "flux-kontext-pro" and (spec.width, spec.height, spec.num_images) == (512, 512, 2)
    resp = client.post(EDITS, data={"prompt": "p", "model": "flux-kontext-max"}, files=files, headers=AUTH)
    assert fake_engine.last_spec.steps == 40


def test_mask_means_fill(client: TestClient, fake_engine: FakeEngine) -> None:
    files = [
        ("image", ("a.png", png_bytes((64, 64)), "image/png")),
        ("mask", ("m.png", mask_png((64, 64), (0, 0, 32, 64)), "image/png")),
    ]
    resp = client.post(EDITS, data={"prompt": "a hat"}, files=files, headers=AUTH)
    assert resp.status_code == 200, resp.text
    req = fake_engine.calls[-1][0]
    assert req.spec.task == "fill" and req.spec.model == "flux-fill" and req.mask is not None
    assert req.mask.getpixel((1, 1)) == 255 and req.mask.getpixel((60, 1)) == 0  # transparent = repaint
    bad = client.post(EDITS, data={"prompt": "a", "model": "flux-kontext-pro"}, files=files, headers=AUTH)
    _err(bad, 400, "mask")


def test_variations(client: TestClient, fake_engine: FakeEngine) -> None:
    files = [("image", ("a.png", png_bytes((300, 200)), "image/png"))]
    resp = client.post("/v1/images/variations", data={"n": "3"}, files=files, headers=AUTH)
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["data"]) == 3
    spec = fake_engine.last_spec
    assert spec.task == "img2img" and spec.model == "flux-dev" and spec.strength == 0.7 and spec.prompt == ""
    _err(client.post("/v1/images/variations", data={"n": "1"}, headers=AUTH), 400, "image")
    _err(client.post("/v1/images/variations", data={"model": "flux-fill"}, files=files, headers=AUTH), 400, "model")


HOSTILE = [
    ("zero-byte", b"", 400, "invalid_image_file"),
    ("truncated", png_bytes((64, 64))[:80], 400, "invalid_image_file"),
    ("text-as-png", b"this is not a png at all", 400, "invalid_image_file"),
    ("bmp", base64.b64decode("Qk0eAAAAAAAAABoAAAAMAAAAAQABAAEAGAAAAP8A"), 400, "invalid_image_file"),
    ("bomb", bomb_png(), 400, "image_too_large"),
]


@pytest.mark.parametrize(("name", "data", "status", "code"), HOSTILE)
def test_hostile_images(client: TestClient, name: str, data: bytes, status: int, code: str) -> None:
    files = [("image[]", (f"{name}.png", data, "image/png"))]
    _err(client.post(EDITS, data={"prompt": "p"}, files=files, headers=AUTH), status, "image", code)


def test_limits_on_count_size_and_mask(client: TestClient) -> None:
    many = [("image[]", (f"{i}.png", png_bytes(), "image/png")) for i in range(17)]
    _err(client.post(EDITS, data={"prompt": "p"}, files=many, headers=AUTH), 400, "image", "too_many_images")
    huge = [("image", ("big.png", b"\x89PNG" + b"\x00" * (50 * 1024 * 1024 + 1), "image/png"))]
    _err(client.post(EDITS, data={"prompt": "p"}, files=huge, headers=AUTH), 413, "image", "image_too_large")
    img = ("image", ("a.png", png_bytes((64, 64)), "image/png"))
    big_mask = [img, ("mask", ("m.png", b"\x89PNG" + b"\x00" * (4 * 1024 * 1024 + 1), "image/png"))]
    _err(client.post(EDITS, data={"prompt": "p"}, files=big_mask, headers=AUTH), 413, "mask", "image_too_large")
    wrong = [img, ("mask", ("m.png", mask_png((32, 32), (0, 0, 8, 8)), "image/png"))]
    _err(client.post(EDITS, data={"prompt": "p"}, files=wrong, headers=AUTH), 400, "mask", "invalid_mask_size")
    _err(client.post(EDITS, data={"prompt": "p"}, headers=AUTH), 400, "image")
    _err(client.post(EDITS, data={"prompt": "p", "image": "not-a-file"}, headers=AUTH), 400, "image")
    _err(client.post(EDITS, data={"model": "flux-kontext-pro"}, files=[img], headers=AUTH), 400, "prompt")
    _err(client.post(EDITS, data={"prompt": "p", "n": "11"}, files=[img], headers=AUTH), 400, "n")
    _err(client.post(EDITS, data={"prompt": "p", "size": "100x100"}, files=[img], headers=AUTH), 400, "size")
    _err(client.post(EDITS, json={"prompt": "p"}, headers=AUTH), 415, "Content-Type")


def _vmodel(client: TestClient, model: str, inp: dict[str, Any]) -> Any:
    return client.post("/vmodel/generate", json={"model": model, "input": inp}, headers=AUTH)


def _finish(client: TestClient, job_id: str) -> dict[str, Any]:
    from tests.api.test_api import _wait_feed

    return _wait_feed(client, job_id)


def test_vmodel_data_url_inputs(client: TestClient, fake_engine: FakeEngine) -> None:
    data_url = "data:image/png;base64," + base64.b64encode(png_bytes((120, 80))).decode()
    resp = _vmodel(client, "flux-dev", {"prompt": "p", "image": data_url, "prompt_strength": 0.6})
    assert _finish(client, resp.json()["id"])["status"] == "succeeded"
    spec = fake_engine.last_spec
    assert spec.task == "img2img" and spec.strength == 0.6 and (spec.width, spec.height) == (1248, 832)
    resp = _vmodel(
        client, "flux-kontext-pro", {"prompt": "p", "input_image": data_url, "aspect_ratio": "match_input_image"}
    )
    assert _finish(client, resp.json()["id"])["status"] == "succeeded"
    assert fake_engine.last_spec.task == "kontext"
    resp = _vmodel(client, "flux-kontext-pro", {"prompt": "p", "input_image": data_url, "aspect_ratio": "16:9"})
    _finish(client, resp.json()["id"])
    assert (fake_engine.last_spec.width, fake_engine.last_spec.height) == (1344, 768)
    bad = "data:text/plain;base64," + base64.b64encode(b"hello").decode()
    _err(
        _vmodel(client, "flux-kontext-pro", {"prompt": "p", "input_image": bad}),
        400,
        "input.input_image",
        "invalid_image_file",
    )
    _err(_vmodel(client, "flux-dev", {"prompt": "p", "aspect_ratio": "match_input_image"}), 400, "input.aspect_ratio")
    _err(
        _vmodel(client, "flux-dev", {"prompt": "p", "image": data_url, "prompt_strength": 2}),
        400,
        "input.prompt_strength",
    )


@pytest.fixture
def private_client(settings: Settings, fake_engine: FakeEngine) -> Iterator[TestClient]:
    # Its own SQLite database; on PostgreSQL a second node on the same database, which shares the storage.
    own = {"data_dir": settings.data_dir / "private"} if not settings.on_postgres else {}
    private = settings.model_copy(update={"allow_private_urls": True, **own})
    with TestClient(create_app(private, engine=fake_engine)) as c:
        yield c


def test_vmodel_url_inputs_need_the_operator_setting(
    client: TestClient, private_client: TestClient, fake_engine: FakeEngine
) -> None:
    with image_server() as base:
        _err(
            _vmodel(client, "flux-dev", {"prompt": "p", "image": f"{base}/cat.png"}),
            400,
            "input.image",
            "invalid_image_url",
        )
        for path in ("/cat.png", "/redirect"):
            resp = _vmodel(private_client, "flux-dev", {"prompt": "p", "image": f"{base}{path}"})
            assert resp.status_code == 200, resp.text
            assert _finish(private_client, resp.json()["id"])["status"] == "succeeded"
            assert fake_engine.calls[-1][0].images[0].size == (96, 64)
        err = _vmodel(private_client, "flux-dev", {"prompt": "p", "image": f"{base}/notes.txt"})
        _err(err, 400, "input.image", "invalid_image_file")
        _err(_vmodel(private_client, "flux-dev", {"prompt": "p", "image": f"{base}/missing"}), 400, "input.image")
    for url in [
        "http://127.0.0.1/",
        "http://169.254.169.254/",
        "http://10.0.0.1/",
        "http://[::1]/",
        "file:///etc/passwd",
    ]:
        _err(
            _vmodel(client, "flux-kontext-pro", {"prompt": "p", "input_image": url}),
            400,
            "input.input_image",
            "invalid_image_url",
        )


def test_inputs_are_not_saved_for_rejected_requests(client: TestClient, settings: Settings) -> None:
    data_url = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    _err(_vmodel(client, "flux-dev", {"prompt": "", "image": data_url}), 400, "input.prompt")
    assert not (Path(settings.outputs_dir) / "inputs").exists()


def test_edit_uploads_are_closed_when_the_request_ends(client: TestClient) -> None:
    # The multipart parser spools each upload to a temporary file; an edit that did not close its form
    # left them open until the garbage collector found them (a ResourceWarning, and descriptors held).
    import gc
    import warnings

    files = [("image", ("a.png", png_bytes((64, 64)), "image/png"))]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        ok = client.post("/v1/images/edits", data={"prompt": "p", "size": "256x256"}, files=files, headers=AUTH)
        bad = client.post("/v1/images/edits", data={"prompt": "p", "n": "99"}, files=files, headers=AUTH)
        var = client.post("/v1/images/variations", data={"size": "256x256"}, files=files, headers=AUTH)
        gc.collect()
    assert ok.status_code == 200 and bad.status_code == 400 and var.status_code == 200, (ok.text, bad.text)
    leaks = [w for w in caught if issubclass(w.category, ResourceWarning) and "SpooledTemporaryFile" in str(w.message)]
    assert leaks == []
