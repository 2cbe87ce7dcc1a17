"""Black Forest Labs' API over the HTTP and job layers (FakeEngine)."""

import base64
import hashlib
import hmac
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from fluxserve.app import create_app
from fluxserve.settings import Settings
from tests.conftest import API_KEY
from tests.support.fakes import FakeEngine
from tests.support.images_util import png_bytes
from tests.support.webhook_receiver import Received, webhook_receiver

XKEY = {"x-key": API_KEY}


def _poll(client: TestClient, polling_url: str) -> dict[str, Any]:
    deadline = time.time() + 10
    while time.time() < deadline:
        body: dict[str, Any] = client.get(polling_url.removeprefix("http://127.0.0.1:8123"), headers=XKEY).json()
        if body["status"] not in ("Pending",):
            return body
        time.sleep(0.02)
    raise AssertionError(body)


def test_flux_dev_submit_and_poll(client: TestClient, fake_engine: FakeEngine) -> None:
    resp = client.post("/v1/flux-dev", json={"prompt": "a cat", "seed": 7, "steps": 10}, headers=XKEY)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["polling_url"].endswith(f"/v1/get_result?id={body['id']}")
    result = _poll(client, body["polling_url"])
    assert result["status"] == "Ready" and result["progress"] == 1.0
    assert result["result"]["seed"] == 7 and result["result"]["prompt"] == "a cat"
    sample = client.get(result["result"]["sample"].removeprefix("http://127.0.0.1:8123"))
    assert sample.status_code == 200 and sample.headers["content-type"] == "image/jpeg"  # BFL's default format
    spec = fake_engine.last_spec
    # flux-dev's guidance comes from the registry, as in every dialect.
    assert (spec.width, spec.height, spec.steps, spec.guidance) == (1024, 768, 10, 3.5)


def test_every_endpoint(client: TestClient, fake_engine: FakeEngine) -> None:
    pairs = [("flux-pro", "flux-pro"), ("flux-pro-1.1", "flux-pro"), ("flux-kontext-pro", "flux-kontext-pro")]
    for endpoint, model in [*pairs, ("flux-kontext-max", "flux-kontext-max")]:
        body = client.post(f"/v1/{endpoint}", json={"prompt": "p", "output_format": "png"}, headers=XKEY).json()
        assert _poll(client, body["polling_url"])["status"] == "Ready", endpoint
        assert fake_engine.last_spec.model == model


def test_kontext_inputs_base64_and_aspect(client: TestClient, fake_engine: FakeEngine) -> None:
    raw = base64.b64encode(png_bytes((200, 100))).decode()
    body = client.post(
        "/v1/flux-kontext-pro", json={"prompt": "p", "input_image": raw, "input_image_2": raw}, headers=XKEY
    ).json()
    assert _poll(client, body["polling_url"])["status"] == "Ready"
    spec = fake_engine.last_spec
    assert spec.task == "kontext" and len(spec.images) == 2 and (spec.width, spec.height) == (1456, 720)
    body = client.post(
        "/v1/flux-kontext-max", json={"prompt": "p", "input_image": raw, "aspect_ratio": "9:16"}, headers=XKEY
    ).json()
    _poll(client, body["polling_url"])
    assert (fake_engine.last_spec.width, fake_engine.last_spec.height) == (768, 1360)


@pytest.mark.parametrize(
    ("endpoint", "body", "loc"),
    [
        ("flux-dev", {"prompt": "p", "width": 1000}, ["body", "width"]),
        ("flux-dev", {"prompt": "p", "width": 2064}, ["body", "width"]),
        ("flux-dev", {"prompt": "p", "height": 128}, ["body", "height"]),
        ("flux-dev", {"prompt": "p", "steps": 0}, ["body", "steps"]),
        ("flux-dev", {"prompt": "p", "guidance": 11}, ["body", "guidance"]),
        ("flux-dev", {"prompt": "p", "safety_tolerance": 7}, ["body", "safety_tolerance"]),
        ("flux-dev", {"prompt": "p", "output_format": "gif"}, ["body", "output_format"]),
        ("flux-dev", {"prompt": "p", "seed": "1"}, ["body", "seed"]),  # a known field of the wrong type
        ("flux-dev", {}, ["body", "prompt"]),
        ("flux-kontext-pro", {"prompt": "p", "prompt_upsampling": "yes"}, ["body", "prompt_upsampling"]),
        ("flux-kontext-pro", {"prompt": "p", "aspect_ratio": "30:9"}, ["body", "aspect_ratio"]),
        ("flux-kontext-pro", {"prompt": "p", "input_image": "%%%"}, ["body", "input_image"]),
        ("flux-kontext-pro", {"prompt": "p", "input_image": "http://169.254.169.254/"}, ["body", "input_image"]),
        ("flux-dev", {"prompt": "p", "webhook_url": "http://127.0.0.1:9/x"}, ["body", "webhook_url"]),
    ],
)
def test_validation_errors_in_bfl_shape(
    client: TestClient, endpoint: str, body: dict[str, Any], loc: list[str]
) -> None:
    resp = client.post(f"/v1/{endpoint}", json=body, headers=XKEY)
    assert resp.status_code == 422, resp.text
    detail = resp.json()["detail"]
    assert isinstance(detail, list) and detail[0]["loc"] == loc and detail[0]["msg"] and detail[0]["type"]


def test_auth_and_unknown_tasks(client: TestClient) -> None:
    resp = client.post("/v1/flux-dev", json={"prompt": "p"})
    assert resp.status_code == 401 and isinstance(resp.json()["detail"], str)
    assert client.post("/v1/flux-dev", json={"prompt": "p"}, headers={"x-key": "wrong"}).status_code == 401
    missing = client.get("/v1/get_result?id=nope", headers=XKEY)
    assert missing.status_code == 404 and missing.json()["status"] == "Task not found"
    vm = client.post(
        "/vmodel/generate",
        json={"model": "flux", "input": {"prompt": "p"}},
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    assert client.get(f"/v1/get_result?id={vm.json()['id']}", headers=XKEY).json()["status"] == "Task not found"


def test_progress_while_pending(settings: Settings) -> None:
    engine = FakeEngine(step_s=0.05)
    with TestClient(create_app(settings, engine=engine)) as client:
        body = client.post("/v1/flux-dev", json={"prompt": "p", "steps": 20}, headers=XKEY).json()
        seen = set()
        deadline = time.time() + 10
        while time.time() < deadline:
            r = client.get(f"/v1/get_result?id={body['id']}", headers=XKEY).json()
            seen.add(r["progress"])
            if r["status"] == "Ready":
                break
            time.sleep(0.05)
        assert any(0 < p < 1 for p in seen)


def test_webhook_with_secret(settings: Settings, fake_engine: FakeEngine) -> None:
    local = settings.model_copy(update={"allow_private_urls": True})
    secret = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
    got = Received(secret=secret)
    with TestClient(create_app(local, engine=fake_engine)) as client, webhook_receiver(got) as url:
        body = client.post(
            "/v1/flux-dev", json={"prompt": "p", "webhook_url": url, "webhook_secret": secret}, headers=XKEY
        ).json()
        assert body["status"] == "Pending" and body["webhook_url"] == url
        assert got.event.wait(10)
        # Stored sealed, never in clear: not in the row, not anywhere in the database file.
        stored = client.app.state.services.store.get_job(body["id"]).webhook["secret"]  # type: ignore[attr-defined]
        assert stored.startswith("sealed:v1:") and secret not in stored
    if local.database.startswith("sqlite:///"):
        assert secret.encode() not in Path(local.database.removeprefix("sqlite:///")).read_bytes()
    assert got.bad_signatures == 0
    delivery = got.deliveries[0]
    assert delivery["body"]["status"] == "Ready" and delivery["body"]["id"] == body["id"]
    # BFL's payload and its own signature, beside Standard Webhooks': HMAC-SHA256 of the raw body.
    result = delivery["body"]["result"]
    assert {"sample", "prompt", "seed"} <= set(result) and isinstance(delivery["body"]["timestamp"], int)
    expected = hmac.new(secret.encode(), delivery["raw"], hashlib.sha256).hexdigest()
    assert delivery["headers"]["x-bfl-signature"] == f"sha256={expected}"


def test_sealed_secrets_round_trip_and_resist_another_key() -> None:
    from cryptography.exceptions import InvalidTag

    from fluxserve.sealed import seal, unseal

    sealed = seal(b"k" * 32, "whsec_abc")
    assert sealed != seal(b"k" * 32, "whsec_abc")  # a fresh nonce each time
    assert unseal(b"k" * 32, sealed) == "whsec_abc"
    assert unseal(b"k" * 32, "whsec_stored_before_sealing") == "whsec_stored_before_sealing"
    with pytest.raises(InvalidTag):
        unseal(b"x" * 32, sealed)


def test_unknown_fields_are_ignored_by_name_as_bfl_does(client: TestClient, fake_engine: FakeEngine) -> None:
    # LiteLLM sends OpenAI-style width/height to Kontext; BFL's API ignores fields it does not know.
    body = {"prompt": "p", "width": 512, "height": 512, "colour": "x" * 100_000, "aspect_ratio": "1:1"}
    resp = client.post("/v1/flux-kontext-pro", json=body, headers=XKEY)
    assert resp.status_code == 200, resp.text
    assert _poll(client, resp.json()["polling_url"])["status"] == "Ready"
    job = client.app.state.services.store.get_job(resp.json()["id"])  # type: ignore[attr-defined]
    assert job.request["input"]["ignored_fields"] == ["colour", "height", "width"]
    assert "colour" not in job.request["input"] and job.spec.width == 1024  # the aspect ratio, not width
    steps = client.post("/v1/flux-pro-1.1", json={"prompt": "p", "steps": 10}, headers=XKEY)
    assert steps.status_code == 200 and fake_engine is not None
