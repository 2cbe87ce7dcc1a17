"""The fields gpt-image-2.5/2.6 clients send (issue 36 #4): qualities above high, formats and animation not
produced here, annotated edits, safety_identifier in usage; each refusal a 400 naming the field."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from fluxserve.app import create_app
from fluxserve.settings import Settings
from tests.conftest import AUTH
from tests.support.fakes import FakeEngine
from tests.support.images_util import png_bytes


def _generate(client: TestClient, **body: Any) -> Any:
    return client.post("/v1/images/generations", json={"prompt": "p", "size": "256x256", **body}, headers=AUTH)


@pytest.mark.parametrize(
    ("model", "quality", "steps"),
    [
        ("flux-dev", "xhigh", 42),  # 28 * 1.5
        ("flux-dev", "max", 50),  # 28 * 2, within the model's 50
        ("flux-dev", "high", 28),  # the default
        ("flux-schnell", "max", 4),  # schnell's range is 4 steps at most
    ],
)
def test_xhigh_and_max_are_more_steps_within_the_models_range(
    client: TestClient, fake_engine: FakeEngine, model: str, quality: str, steps: int
) -> None:
    resp = _generate(client, model=model, quality=quality)
    assert resp.status_code == 200, resp.text
    assert resp.json()["quality"] == quality and resp.json()["size"] == "256x256"
    assert fake_engine.calls[-1][0].spec.steps == steps


def test_explicit_steps_win_over_quality(client: TestClient, fake_engine: FakeEngine) -> None:
    assert _generate(client, model="flux-dev", quality="max", steps=10).status_code == 200
    assert fake_engine.calls[-1][0].spec.steps == 10


@pytest.mark.parametrize(
    ("field", "value"),
    [("output_format", "gif"), ("output_format", "svg"), ("frame_count", 8), ("frame_duration_ms", 100)],
)
def test_what_is_not_produced_here_is_a_400_naming_the_field(client: TestClient, field: str, value: Any) -> None:
    resp = _generate(client, **{field: value})
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == field
    assert "not produced here" in resp.json()["error"]["message"]


def test_newer_fields_are_accepted(client: TestClient) -> None:
    body = {"complexity": "high", "moderation": "low", "input_fidelity": "high", "background": "opaque"}
    resp = _generate(client, **body)
    assert resp.status_code == 200, resp.text
    assert resp.json()["output_format"] == "png" and resp.json()["background"] == "opaque"


def test_markup_on_an_edit_is_a_400_naming_it(client: TestClient) -> None:
    files = {
        "image": ("a.png", png_bytes((256, 256)), "image/png"),
        "markup": ("m.png", png_bytes((256, 256)), "image/png"),
    }
    resp = client.post("/v1/images/edits", data={"prompt": "p"}, files=files, headers=AUTH)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "markup"
    gif = client.post(
        "/v1/images/edits",
        data={"prompt": "p", "output_format": "gif"},
        files={"image": ("a.png", png_bytes((256, 256)), "image/png")},
        headers=AUTH,
    )
    assert gif.status_code == 400 and gif.json()["error"]["param"] == "output_format"


def test_usage_by_end_user_reads_safety_identifier_then_user(settings: Settings) -> None:
    with TestClient(create_app(settings, engine=FakeEngine())) as client:
        for body in ({"safety_identifier": "alice"}, {"safety_identifier": "alice"}, {"user": "bob"}, {}):
            assert _generate(client, **body).status_code == 200
        rows = client.get("/v1/usage?by=end_user", headers=AUTH).json()["data"]
        assert {r["end_user"]: r["images"] for r in rows} == {"alice": 2, "bob": 1, "": 1}
        plain = client.get("/v1/usage", headers=AUTH).json()["data"]
        assert len(plain) == 1 and plain[0]["images"] == 4 and "end_user" not in plain[0]
        bad = client.get("/v1/usage?by=colour", headers=AUTH)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "by"
