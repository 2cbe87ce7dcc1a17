"""FLUX.2 in every dialect, and dialect defaults that follow the model registry (FakeEngine)."""

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
from tests.support.images_util import png_bytes
from tests.support.polling import wait_for

XKEY = {"x-key": AUTH["Authorization"].split()[1]}


def _data_url(size: tuple[int, int] = (384, 256), color: tuple[int, int, int] = (200, 30, 30)) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(size, color)).decode()


def _files(count: int, size: tuple[int, int] = (384, 256)) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("image[]", (f"{i}.png", png_bytes(size, (10 * i, 20, 30)), "image/png")) for i in range(count)]


def _bfl_spec(client: TestClient, fake: FakeEngine, endpoint: str, body: dict[str, Any]) -> Any:
    resp = client.post(f"/v1/{endpoint}", json=body, headers=XKEY)
    assert resp.status_code == 200, resp.text
    poll = resp.json()["polling_url"].split("8123")[1]
    # Time-bounded, not a count of polls: on PostgreSQL 200 quick polls could end before the job did.
    ended = wait_for(lambda: client.get(poll, headers=XKEY).json(), lambda b: b["status"] != "Pending", interval=0.02)
    assert ended["status"] == "Ready", ended
    return fake.last_spec


def test_openai_generations_and_edits_on_klein(client: TestClient, fake_engine: FakeEngine) -> None:
    resp = client.post("/v1/images/generations", json={"model": "flux-2-klein-4b", "prompt": "p"}, headers=AUTH)
    assert resp.status_code == 200, resp.text
    spec = fake_engine.last_spec
    assert (spec.task, spec.steps, spec.guidance) == ("text2img", 4, None)
    resp = client.post(
        "/v1/images/edits", data={"model": "flux-2-klein-4b", "prompt": "p"}, files=_files(3), headers=AUTH
    )
    assert resp.status_code == 200, resp.text
    spec = fake_engine.last_spec
    # Output size: the first reference's aspect ratio (3:2) at about 1 MP.
    assert (spec.task, len(spec.images), spec.width, spec.height) == ("references", 3, 1248, 832)


@pytest.mark.parametrize(
    ("model", "files", "words"),
    [
        ("flux-2-klein-4b", _files(5), ["at most 4"]),
        ("flux-2-dev", _files(7), ["at most 6"]),
        ("flux-2-klein-4b", _files(1, (40, 300)), ["at least 64 px"]),
        ("flux-2-klein-4b", _files(1, (64, 600)), ["8:1"]),
    ],
)
def test_openai_edit_reference_limits(client: TestClient, model: str, files: Any, words: list[str]) -> None:
    resp = client.post("/v1/images/edits", data={"model": model, "prompt": "p"}, files=files, headers=AUTH)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == "image" and all(w in err["message"] for w in words), err


def test_vmodel_input_images(client: TestClient, fake_engine: FakeEngine) -> None:
    inp = {"prompt": "p", "input_images": [_data_url(), _data_url((256, 256))]}
    resp = client.post("/vmodel/generate", json={"model": "flux-2-pro", "input": inp}, headers=AUTH)
    assert resp.status_code == 200, resp.text
    job = resp.json()["id"]
    url = f"/vmodel/feed/{job}"
    wait_for(lambda: client.get(url, headers=AUTH).json(), lambda f: f["status"] == "succeeded", interval=0.02)
    spec = fake_engine.last_spec
    assert (spec.task, len(spec.images), spec.steps, spec.guidance) == ("references", 2, 28, 4.0)
    both = {"prompt": "p", "input_image": _data_url(), "input_images": [_data_url()]}
    resp = client.post("/vmodel/generate", json={"model": "flux-2-pro", "input": both}, headers=AUTH)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "input.input_images"
    five = {"prompt": "p", "input_images": [_data_url()] * 5}
    resp = client.post("/vmodel/generate", json={"model": "flux-2-klein-9b", "input": five}, headers=AUTH)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "input.input_images[4]", resp.text


def _predict(client: TestClient, name: str, inp: dict[str, Any]) -> Any:
    return client.post(
        f"/v1/models/black-forest-labs/{name}/predictions", json={"input": inp}, headers={**AUTH, "Prefer": "wait=30"}
    )


def test_replicate_flux2_models(client: TestClient, fake_engine: FakeEngine) -> None:
    resp = _predict(client, "flux-2-pro", {"prompt": "p", "input_images": [_data_url(), _data_url()]})
    assert resp.status_code == 201 and resp.json()["status"] == "succeeded", resp.text
    assert isinstance(resp.json()["output"], str)  # one URI, as replicate.com answers for pro/dev/flex/max
    spec = fake_engine.last_spec
    assert (spec.task, len(spec.images), spec.width, spec.height) == ("references", 2, 1024, 1024)  # 1:1 default
    resp = _predict(
        client, "flux-2-klein-4b", {"prompt": "p", "images": [_data_url()], "aspect_ratio": "match_input_image"}
    )
    assert resp.status_code == 201 and isinstance(resp.json()["output"], list), resp.text
    assert (fake_engine.last_spec.width, fake_engine.last_spec.height) == (1248, 832)
    resp = _predict(
        client,
        "flux-2-klein-4b",
        {"prompt": "p", "images": [_data_url()], "output_megapixels": "2", "aspect_ratio": "match_input_image"},
    )
    assert resp.status_code == 201 and (fake_engine.last_spec.width, fake_engine.last_spec.height) == (1776, 1184)
    resp = _predict(
        client, "flux-2-flex", {"prompt": "p", "steps": 12, "guidance": 2, "aspect_ratio": "16:9", "resolution": "2 MP"}
    )
    assert resp.status_code == 201, resp.text
    spec = fake_engine.last_spec
    assert (spec.steps, spec.guidance, spec.width, spec.height) == (12, 2, 1920, 1088)
    resp = _predict(client, "flux-2-dev", {"prompt": "p", "aspect_ratio": "custom", "width": 640, "height": 480})
    assert resp.status_code == 201 and (fake_engine.last_spec.width, fake_engine.last_spec.height) == (640, 480)


@pytest.mark.parametrize(
    ("name", "inp", "field"),
    [
        ("flux-2-flex", {"prompt": "p", "steps": 60}, "input.steps"),
        ("flux-2-flex", {"prompt": "p", "guidance": 1}, "input.guidance"),
        ("flux-2-klein-4b", {"prompt": "p", "images": [_data_url()] * 5}, "input.images[4]"),
        ("flux-2-pro", {"prompt": "p", "aspect_ratio": "custom", "width": 640}, "input.width"),
        ("flux-2-pro", {"prompt": "p", "aspect_ratio": "custom", "width": 1000, "height": 512}, "input.width"),
        ("flux-2-pro", {"prompt": "p", "resolution": "3 MP"}, "input.resolution"),
        ("flux-2-pro", {"prompt": "p", "input_images": ["%%%"]}, "input.input_images[0]"),
    ],
)
def test_replicate_flux2_bad_input(client: TestClient, name: str, inp: dict[str, Any], field: str) -> None:
    resp = _predict(client, name, inp)
    assert resp.status_code == 422, resp.text
    assert resp.json()["invalid_fields"][0]["field"] == field, resp.text


def test_bfl_flux2_endpoints(client: TestClient, fake_engine: FakeEngine) -> None:
    spec = _bfl_spec(
        client,
        fake_engine,
        "flux-2-pro",
        {"prompt": "p", "input_image": _data_url(), "input_image_2": _data_url((256, 256))},
    )
    assert (spec.task, len(spec.images), spec.width, spec.height, spec.steps) == ("references", 2, 1248, 832, 28)
    spec = _bfl_spec(client, fake_engine, "flux-2-klein-4b", {"prompt": "p", "width": 512, "height": 768})
    assert (spec.model, spec.width, spec.height, spec.steps, spec.guidance) == ("flux-2-klein-4b", 512, 768, 4, None)
    spec = _bfl_spec(client, fake_engine, "flux-2-flex", {"prompt": "p", "steps": 20, "guidance": 5})
    assert (spec.steps, spec.guidance, spec.width, spec.height) == (20, 5, 1024, 1024)
    spec = _bfl_spec(client, fake_engine, "flux-2-klein-9b-preview", {"prompt": "p"})
    assert spec.model == "flux-2-klein-9b-kv"


@pytest.mark.parametrize(
    ("endpoint", "body", "loc"),
    [
        ("flux-2-klein-4b", {"prompt": "p", "input_image_5": "x"}, ["body", "input_image_5"]),
        ("flux-2-pro", {"prompt": "p", "input_image_9": "x"}, ["body", "input_image_9"]),
        ("flux-2-pro", {"prompt": "p", "width": 512}, ["body", "height"]),
        ("flux-2-pro", {"prompt": "p", "seed": 1.5}, ["body", "seed"]),  # steps there: ignored, as BFL does
        ("flux-2-flex", {"prompt": "p", "guidance": 20}, ["body", "guidance"]),
        ("flux-2-max", {"prompt": "p", "input_image": _data_url((30, 200))}, ["body", "input_image"]),
    ],
)
def test_bfl_flux2_bad_input(client: TestClient, endpoint: str, body: dict[str, Any], loc: list[str]) -> None:
    resp = client.post(f"/v1/{endpoint}", json=body, headers=XKEY)
    assert resp.status_code == 422, resp.text
    assert resp.json()["detail"][0]["loc"] == loc, resp.text


def test_models_list_the_registry_facts(client: TestClient) -> None:
    models = {m["id"]: m for m in client.get("/v1/models", headers=AUTH).json()["data"]}
    klein = models["flux-2-klein-4b"]
    assert klein["guidance"] is None and klein["max_images"] == 4 and klein["license"] == "Apache-2.0"
    assert klein["steps"] == {"default": 4, "min": 1, "max": 8} and "images" in klein["inputs"]
    assert models["flux-2-flex"]["guidance"] == {"default": 4.5, "min": 1.5, "max": 10.0}


@pytest.fixture
def tuned(tmp_path: Path, fake_engine: FakeEngine) -> Iterator[TestClient]:
    """An operator's TOML: new defaults and limits, a remapped hosted name, a new FLUX.2 name."""
    cfg = tmp_path / "models.toml"
    cfg.write_text(
        "[models.flux-dev]\nsteps = 20\nguidance = 2.0\nmax_steps = 24\n"
        '[models.flux-kontext-pro]\nkind = "flux2"\nweights = "black-forest-labs/FLUX.2-klein-4B"\n'
        "steps = 4\nmax_steps = 8\nmax_images = 4\n"
        '[models.house-style]\nkind = "flux2"\nweights = "/models/klein"\nsteps = 6\nmax_steps = 8\n'
    )
    settings = Settings(
        data_dir=tmp_path / "data", api_key=AUTH["Authorization"].split()[1], port=8123, model_config_file=cfg
    )
    with TestClient(create_app(settings, engine=fake_engine)) as c:
        yield c


def test_an_operators_toml_reaches_every_dialect(tuned: TestClient, fake_engine: FakeEngine) -> None:
    client = tuned
    assert _predict(client, "flux-dev", {"prompt": "p"}).status_code == 201
    assert (fake_engine.last_spec.steps, fake_engine.last_spec.guidance) == (20, 2.0)
    assert _bfl_spec(client, fake_engine, "flux-dev", {"prompt": "p"}).steps == 20
    resp = client.post("/v1/images/generations", json={"model": "flux-dev", "prompt": "p"}, headers=AUTH)
    assert resp.status_code == 200 and fake_engine.last_spec.steps == 20
    resp = _predict(client, "flux-dev", {"prompt": "p", "num_inference_steps": 28})  # past the TOML's max_steps
    assert resp.status_code == 422 and "between 1 and 24" in resp.json()["detail"]
    # The seed's edit name, pointed at FLUX.2: native multi-reference edits, its limit applied.
    resp = client.post("/v1/images/edits", data={"prompt": "p"}, files=_files(3), headers=AUTH)
    assert resp.status_code == 200 and fake_engine.last_spec.task == "references"
    resp = client.post("/v1/images/edits", data={"prompt": "p"}, files=_files(5), headers=AUTH)
    assert resp.status_code == 400 and "at most 4" in resp.json()["error"]["message"]
    spec = _bfl_spec(
        client,
        fake_engine,
        "flux-kontext-pro",
        {"prompt": "p", "input_image": _data_url(), "input_image_2": _data_url()},
    )
    assert (spec.task, spec.steps) == ("references", 4)
    resp = client.post("/vmodel/generate", json={"model": "house-style", "input": {"prompt": "p"}}, headers=AUTH)
    assert resp.status_code == 200
    models = {m["id"]: m for m in client.get("/v1/models", headers=AUTH).json()["data"]}
    assert models["house-style"]["steps"]["default"] == 6 and models["flux-dev"]["steps"]["max"] == 24


def test_inline_images_in_lists_are_elided_from_the_job_row(client: TestClient, fake_engine: FakeEngine) -> None:
    # Before, every GET, list page and webhook echoed input_images whole (megabytes per job).
    import io
    import os

    from PIL import Image

    buf = io.BytesIO()
    Image.frombytes("RGB", (512, 512), os.urandom(512 * 512 * 3)).save(buf, "PNG")  # noise: ~770 KB
    big = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    ok = _predict(client, "flux-2-pro", {"prompt": "p", "input_images": [big, _data_url()]})
    assert ok.status_code == 201, ok.text
    echoed = ok.json()["input"]["input_images"]
    assert "elided" in echoed[0] and len(echoed[0]) < 100 and echoed[1] == _data_url(), echoed[0][:80]
    again = client.get(f"/v1/predictions/{ok.json()['id']}", headers=AUTH).json()["input"]["input_images"]
    assert again == echoed
