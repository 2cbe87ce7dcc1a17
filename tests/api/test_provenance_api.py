"""Provenance through the dialects (issue 37): every dialect's images carry a valid C2PA manifest, XMP and the
watermark; POST /v1/content_provenance_checks reads them back in OpenAI's shape, naming the job to its own key
only; a stripped copy is still known by its watermark; a signing failure fails the job, never ships it."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from fluxserve.app import create_app
from fluxserve.auth import create_key
from fluxserve.migrations import open_store
from fluxserve.settings import Settings
from tests.conftest import AUTH
from tests.support.fakes import FakeEngine
from tests.support.images_util import encoded, png_bytes
from tests.support.provenance_util import c2pa_report, operator_pair, photo, stripped

TRAINED = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
XKEY = {"x-key": AUTH["Authorization"].removeprefix("Bearer ")}


class PhotoEngine(FakeEngine):
    """The fake engine's calls and timing, with photo-like images (a flat colour is no generated image)."""

    def generate(self, requests: Any, on_step: Any) -> list[list[Image.Image]]:
        made = super().generate(requests, on_step)
        return [[photo(1024, seed=i.getpixel((0, 0))[0]).resize(i.size) for i in images] for images in made]


@pytest.fixture
def fake_engine() -> FakeEngine:
    return PhotoEngine()


def _replicate(client: TestClient, fmt: str = "webp") -> tuple[str, bytes]:
    body = {"input": {"prompt": "p", "output_format": fmt, "num_inference_steps": 4}}
    job = client.post(
        "/v1/models/black-forest-labs/flux-dev/predictions", json=body, headers={**AUTH, "Prefer": "wait=30"}
    ).json()
    assert job["status"] == "succeeded", job
    return job["id"], client.get(httpx.URL(job["output"][0]).raw_path.decode()).content


def _check(client: TestClient, data: bytes, headers: dict[str, str] = AUTH) -> dict[str, Any]:
    resp = client.post("/v1/content_provenance_checks", files={"file": ("x", data)}, headers=headers)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "content_provenance_check" and abs(body["created_at"] - time.time()) < 60
    return {r["type"]: r for r in body["results"]}


def test_every_dialects_images_carry_a_valid_manifest_xmp_and_watermark(client: TestClient) -> None:
    made: dict[str, bytes] = {}
    made["replicate webp"] = _replicate(client, "webp")[1]
    body = {"model": "flux-schnell", "prompt": "p", "size": "256x256", "response_format": "b64_json"}
    made["openai png"] = base64.b64decode(
        client.post("/v1/images/generations", json=body, headers=AUTH).json()["data"][0]["b64_json"]
    )
    task = client.post("/v1/flux-dev", json={"prompt": "p", "output_format": "jpeg"}, headers=XKEY).json()
    for _ in range(200):
        result = client.get(f"/v1/get_result?id={task['id']}", headers=XKEY).json()
        if result["status"] == "Ready":
            break
        time.sleep(0.05)
    made["bfl jpeg"] = client.get(httpx.URL(result["result"]["sample"]).raw_path.decode()).content
    for what, data in made.items():
        state, failures, manifest = c2pa_report(data)
        assert (state, failures) == ("Valid", ["signingCredential.untrusted"]), what
        assert TRAINED in str(manifest), what
        image = Image.open(io.BytesIO(data))
        assert TRAINED.encode() in (image.info.get("xmp") or image.info["XML:com.adobe.xmp"].encode()), what
        found = _check(client, data)
        assert found["c2pa"]["outcome"] == "detected" and found["c2pa"]["validation_state"] == "valid", what
        assert found["c2pa"]["issuer"].startswith("fluxserve self-signed"), what
        assert found["watermark"]["outcome"] == "detected" and found["watermark"]["job"], what


def test_the_check_names_the_job_to_its_own_key_and_knows_a_stripped_copy(
    settings: Settings, fake_engine: FakeEngine
) -> None:
    settings.data_dir.mkdir(parents=True)
    other = {"Authorization": f"Bearer {create_key(open_store(settings.database), 'other').key}"}
    with TestClient(create_app(settings, engine=fake_engine)) as client:
        job_id, data = _replicate(client, "png")
        found = _check(client, data)
        assert found["watermark"]["job"] == job_id and found["c2pa"]["model"] == "flux-dev"
        assert found["c2pa"]["generated_at"].endswith("Z")
        theirs = _check(client, data, other)
        assert theirs["watermark"]["outcome"] == "detected" and theirs["watermark"]["job"] is None
        copy = _check(client, stripped(data, "JPEG", quality=75))
        assert copy["c2pa"] == {**copy["c2pa"], "outcome": "not_detected", "validation_state": "not_present"}
        assert copy["watermark"]["outcome"] == "detected" and copy["watermark"]["job"] == job_id
        foreign = _check(client, encoded(photo(512), "PNG"))
        assert foreign["c2pa"]["outcome"] == foreign["watermark"]["outcome"] == "not_detected"


def test_bad_checks_are_4xx_in_openais_shape(client: TestClient) -> None:
    resp = client.post("/v1/content_provenance_checks", json={"file": "x"}, headers=AUTH)
    assert resp.status_code == 415 and "multipart/form-data" in resp.json()["error"]["message"]
    resp = client.post("/v1/content_provenance_checks", files={"file": ("a.txt", b"hello")}, headers=AUTH)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "file"
    resp = client.post("/v1/content_provenance_checks", files={"other": ("a.png", png_bytes())}, headers=AUTH)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "file"
    resp = client.post("/v1/content_provenance_checks", files={"file": ("a.png", png_bytes())})
    assert resp.status_code == 401


def test_provenance_off_marks_nothing(settings: Settings, fake_engine: FakeEngine) -> None:
    settings.provenance = "off"
    with TestClient(create_app(settings, engine=fake_engine)) as client:
        _, data = _replicate(client, "png")
        found = _check(client, data)
        assert found["c2pa"]["validation_state"] == "not_present" and found["watermark"]["outcome"] == "not_detected"


def test_an_operators_certificate_signs_and_a_refused_one_stops_the_start(
    settings: Settings, fake_engine: FakeEngine
) -> None:
    settings.c2pa_cert, settings.c2pa_key = operator_pair("Acme Images signing")
    with TestClient(create_app(settings, engine=fake_engine)) as client:
        _, data = _replicate(client, "jpg")
        assert _check(client, data)["c2pa"]["issuer"] == "Acme Images signing"
    settings.c2pa_key = operator_pair()[1]  # another key: not the certificate's
    with pytest.raises(ValueError, match="not the key of the certificate"), TestClient(create_app(settings)):
        pass


@pytest.fixture
def failing_signer(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    from fluxserve.provenance import manifest

    real = manifest.Signer.sign
    calls = {"n": 0}

    def sign(self: manifest.Signer, data: bytes, fmt: str, claim: manifest.Claim) -> bytes:
        calls["n"] += 1
        if claim.model == "probe":  # the start-up probe passes
            return real(self, data, fmt, claim)
        raise RuntimeError("the HSM is unreachable")

    monkeypatch.setattr(manifest.Signer, "sign", sign)
    yield


def test_a_signing_failure_fails_the_job_and_stores_nothing(
    settings: Settings, fake_engine: FakeEngine, failing_signer: None
) -> None:
    with TestClient(create_app(settings, engine=fake_engine), client=("127.0.0.1", 1)) as client:
        body = {"input": {"prompt": "p", "num_inference_steps": 4}}
        job = client.post(
            "/v1/models/black-forest-labs/flux-dev/predictions", json=body, headers={**AUTH, "Prefer": "wait=30"}
        ).json()
        assert job["status"] == "failed" and "could not mark the image" in job["error"]
        assert "HSM is unreachable" in job["error"]
        metrics = client.get("/metrics").text
        assert 'fluxserve_provenance_total{operation="sign",outcome="failed"} 1.0' in metrics
    assert not list(settings.outputs_dir.glob(f"{job['id']}/out-*"))  # nothing unmarked was stored


def test_an_edit_lists_the_clients_images_as_ingredients(client: TestClient) -> None:
    """The device worker reads the stored inputs back for the manifest: the first is the parent, the second
    and the mask components; the edit is composite AI media."""
    first = encoded(photo(256), "PNG")
    _, earlier = _replicate(client, "png")  # an image of ours: its own manifest is kept in the ingredient
    files = [("image[]", ("a.png", first, "image/png")), ("image[]", ("b.png", earlier, "image/png"))]
    data = {"prompt": "combine", "model": "flux-kontext-pro", "size": "512x512", "response_format": "b64_json"}
    resp = client.post("/v1/images/edits", data=data, files=files, headers=AUTH)
    assert resp.status_code == 200, resp.text
    out = base64.b64decode(resp.json()["data"][0]["b64_json"])
    state, failures, manifest = c2pa_report(out)
    assert (state, failures) == ("Valid", ["signingCredential.untrusted"])
    assert [i["relationship"] for i in manifest["ingredients"]] == ["parentOf", "componentOf"]
    assert manifest["ingredients"][1].get("active_manifest") and not manifest["ingredients"][0].get("active_manifest")
    assert "compositeWithTrainedAlgorithmicMedia" in str(manifest)
    xmp = Image.open(io.BytesIO(out)).info.get("XML:com.adobe.xmp", "")
    assert "compositeWithTrainedAlgorithmicMedia" in xmp


def test_the_relay_fal_and_a1111_images_are_marked_too(client: TestClient) -> None:
    fal = {"Authorization": AUTH["Authorization"].replace("Bearer", "Key")}
    made: dict[str, bytes] = {}
    sync = client.post("/fal-run/fal-ai/flux/dev", json={"prompt": "p", "sync_mode": True}, headers=fal).json()
    made["fal jpeg"] = base64.b64decode(sync["images"][0]["url"].partition(",")[2])
    a1111 = client.post("/sdapi/v1/txt2img", json={"prompt": "p", "width": 256, "height": 256}, headers=AUTH)
    assert a1111.status_code == 200, a1111.text
    made["a1111 png"] = base64.b64decode(a1111.json()["images"][0])
    job = client.post("/vmodel/generate", json={"model": "flux-schnell", "input": {"prompt": "p"}}, headers=AUTH)
    for _ in range(300):
        feed = client.get(f"/vmodel/feed/{job.json()['id']}", headers=AUTH).json()
        if feed["status"] == "succeeded":
            break
        time.sleep(0.02)
    made["relay"] = client.get(httpx.URL(feed["output"][0]).raw_path.decode()).content
    for what, data in made.items():
        assert c2pa_report(data)[:2] == ("Valid", ["signingCredential.untrusted"]), what
        found = _check(client, data)
        assert found["watermark"]["outcome"] == "detected" and found["watermark"]["job"], what
