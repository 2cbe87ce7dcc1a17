"""The hosted-only FLUX 3 names (issue 36 #2): served only where an upstream is configured for them, translated
into BFL's FLUX 3 and FLUX 3.1 shapes (and fal's BFL ids), a retired name pointed at one taking its shape."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from fluxserve.app import create_app
from fluxserve.models import ModelRegistry
from fluxserve.models.upstreams import parse_upstreams
from fluxserve.settings import Settings
from fluxserve.upstream.base import Inputs
from fluxserve.upstream.bfl import BFL
from fluxserve.upstream.fal import Fal
from tests.conftest import API_KEY, AUTH
from tests.support.fakes import FakeEngine

# A base URL nothing answers on (the discard port): the jobs these tests make are never meant to run.
HOSTED = """
[upstreams.bfl]
kind = "bfl"
base_url = "http://127.0.0.1:9"
[models.flux-3-image]
upstream = "bfl"
[models."flux-3.1-image"]
upstream = "bfl"
[models.flux-2-pro]
upstream = "bfl"
upstream_model = "flux-3-image"
"""


def _registry(tmp_path: Path, text: str = HOSTED) -> ModelRegistry:
    path = tmp_path / "up.toml"
    path.write_text(text)
    return ModelRegistry.default().layered(path)


def _sent(model: str, spec: Any, inputs: Inputs | None = None, kind: str = "bfl") -> tuple[str, dict[str, Any]]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"id": "t1", "request_id": "r1", "polling_url": ""})

    config = parse_upstreams({"u": {"kind": kind, "base_url": "https://up.example"}}, "t")["u"]
    provider = BFL(config) if kind == "bfl" else Fal(config)
    provider.submit(httpx.Client(transport=httpx.MockTransport(handler)), spec, model, inputs or Inputs([]), "k")
    return seen[0].url.path, json.loads(seen[0].content)


def test_hosted_names_exist_only_where_an_upstream_serves_them(tmp_path: Path) -> None:
    assert "flux-3-image" not in ModelRegistry.default() and "flux-3.1-image" not in ModelRegistry.default()
    reg = _registry(tmp_path)
    three, three_one = reg.get("flux-3-image"), reg.get("flux-3.1-image")
    assert three.kind == three_one.kind == "flux3" and three.image_limit == 10 and not three.is_local
    assert three_one.max_pixels == 4096 * 4096  # FLUX 3.1: up to 16 MP


def test_flux3_shape_size_as_resolution_and_aspect_ratio_references_as_images(tmp_path: Path) -> None:
    reg = _registry(tmp_path)
    spec = reg.get("flux-3-image").make_spec(prompt="p", width=1344, height=768, seed=4, steps=20)
    path, body = _sent("flux-3-image", spec, Inputs([b"\x89PNG1", b"\x89PNG2"]))
    assert path == "/v1/flux-3-image"
    assert (body["resolution"], body["aspect_ratio"], body["seed"], body["steps"]) == ("1k", "7:4", 4, 20)
    assert [i[:22] for i in body["images"]] == ["data:image/png;base64,"] * 2 and "input_image" not in body
    square = reg.get("flux-3-image").make_spec(prompt="p", width=768, height=768)
    assert _sent("flux-3-image", square)[1]["resolution"] == "768sq"


def test_flux31_shape_is_the_exact_size_without_seed_or_steps_plus_its_own_fields(tmp_path: Path) -> None:
    reg = _registry(tmp_path)
    spec = reg.get("flux-3.1-image").make_spec(prompt="p", width=3072, height=2048, seed=4)
    spec = spec.__class__(**{**spec.to_dict(), "hosted": {"mode": "quality", "search": True}})
    path, body = _sent("flux-3.1-image", spec)
    assert path == "/v1/flux-3.1-image" and (body["width"], body["height"]) == (3072, 2048)
    assert "seed" not in body and "steps" not in body and body["mode"] == "quality" and body["search"] is True


def test_a_retired_name_pointed_at_flux3_takes_its_shape(tmp_path: Path) -> None:
    reg = _registry(tmp_path)
    assert reg.upstream_model("flux-2-pro", "bfl") == "flux-3-image"
    spec = reg.get("flux-2-pro").make_spec(prompt="p", width=1024, height=1024)
    path, body = _sent(reg.upstream_model("flux-2-pro", "bfl"), spec, Inputs([b"\x89PNG"]))
    assert path == "/v1/flux-3-image" and body["resolution"] == "1k" and len(body["images"]) == 1


def test_fal_serves_bfls_flux3_ids_under_their_publisher() -> None:
    spec = ModelRegistry.default().get("flux-3-image-klein").make_spec(prompt="p", width=512, height=512)
    path, body = _sent("blackforestlabs/flux-3/text-to-image", spec, kind="fal")
    assert path == "/blackforestlabs/flux-3/text-to-image" and body["image_size"] == {"width": 512, "height": 512}
    assert _sent("flux-pro/kontext", spec, kind="fal")[0] == "/fal-ai/flux-pro/kontext"  # fal's own, as before


@pytest.fixture
def hosted_client(settings: Settings, tmp_path: Path) -> Iterator[TestClient]:
    path = tmp_path / "up.toml"
    path.write_text(HOSTED)
    local = settings.model_copy(update={"upstream_config_file": path, "allow_private_urls": True})
    with TestClient(create_app(local, engine=FakeEngine())) as client:
        yield client


def test_dialects_map_onto_the_hosted_names(hosted_client: TestClient) -> None:
    xkey = {"x-key": API_KEY}
    store = hosted_client.app.state.services.store  # type: ignore[attr-defined]
    body = {"prompt": "p", "mode": "quality", "search": True, "seed": 5, "resolution": "4k", "aspect_ratio": "1:1"}
    made = hosted_client.post("/v1/flux-3.1-image", json=body, headers=xkey)
    assert made.status_code == 200, made.text
    job = store.get_job(made.json()["id"])
    assert job.spec.hosted == {"mode": "quality", "search": True} and (job.spec.width, job.spec.height) == (4096, 4096)
    assert "seed" in job.request["input"]["ignored_fields"]  # BFL refuses seed for 3.1: not passed on
    mask = "https://example.com/mask.png"
    masked = hosted_client.post("/v1/flux-3.1-image", json={"prompt": "p", "mask": mask}, headers=xkey)
    assert masked.status_code == 200 and store.get_job(masked.json()["id"]).spec.hosted == {"mask": mask}
    grounded = hosted_client.post("/v1/flux-3-image", json={"prompt": "p", "grounding": True}, headers=xkey)
    assert grounded.status_code == 200 and store.get_job(grounded.json()["id"]).spec.hosted == {"grounding": True}
    # OpenAI's and the relay's requests reach the same names; /v1/models lists them here.
    openai = hosted_client.post(
        "/v1/images/generations",
        json={"model": "flux-3-image", "prompt": "p", "size": "1344x768", "async": True},
        headers=AUTH,
    )
    assert openai.status_code == 202, openai.text
    replicate = hosted_client.post(
        "/v1/models/black-forest-labs/flux-3-image/predictions",
        json={"input": {"prompt": "p", "aspect_ratio": "16:9"}},
        headers=AUTH,
    )
    assert replicate.status_code == 201, replicate.text
    assert store.get_job(replicate.json()["id"]).spec.model == "flux-3-image"
    relay = hosted_client.post(
        "/vmodel/generate", json={"model": "flux-3.1-image", "input": {"prompt": "p"}}, headers=AUTH
    )
    assert relay.status_code == 200, relay.text
    listed = {m["id"] for m in hosted_client.get("/v1/models", headers=AUTH).json()["data"]}
    assert {"flux-3-image", "flux-3.1-image"} <= listed


def test_hosted_endpoints_are_404_where_no_upstream_serves_them(client: TestClient) -> None:
    resp = client.post("/v1/flux-3.1-image", json={"prompt": "p"}, headers={"x-key": API_KEY})
    assert resp.status_code == 404
    listed = {m["id"] for m in client.get("/v1/models", headers=AUTH).json()["data"]}
    assert "flux-3-image" not in listed


def test_an_unquoted_dotted_name_is_a_start_up_error_that_says_to_quote_it(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r'must be quoted: \[models\."flux-3\.1-image"\]'):
        _registry(
            tmp_path,
            HOSTED.replace('[models."flux-3.1-image"]', "[models.flux-3.1-image]"),
        )


def test_the_upstream_webhook_route_takes_only_a_valid_signature(settings: Settings, tmp_path: Path) -> None:
    import hashlib
    import hmac

    from fluxserve.upstream.hooks import hook_secret

    path = tmp_path / "up.toml"
    path.write_text(HOSTED)
    local = settings.model_copy(update={"upstream_config_file": path, "public_url": "https://flux.example"})
    with TestClient(create_app(local, engine=FakeEngine())) as client:
        services = client.app.state.services  # type: ignore[attr-defined]
        body = b'{"id": "t1", "status": "Ready"}'
        secret = hook_secret(services.secret, "bfl", "job1-0")
        good = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        headers = {"content-type": "application/json"}
        ok = client.post("/v1/upstream-hooks/bfl/job1-0", content=body, headers={**headers, "X-BFL-Signature": good})
        assert ok.status_code == 200, ok.text
        for upstream, ref, sig in (("bfl", "job1-0", "sha256=00"), ("bfl", "job2-0", good), ("nope", "job1-0", good)):
            bad = client.post(
                f"/v1/upstream-hooks/{upstream}/{ref}", content=body, headers={**headers, "X-BFL-Signature": sig}
            )
            assert bad.status_code == 401, (upstream, ref)
