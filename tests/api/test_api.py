"""HTTP and job layers over the FakeEngine."""

import base64
import io
import random
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from fluxserve.app import create_app
from fluxserve.auth import create_key
from fluxserve.migrations import open_store
from fluxserve.models import ModelRegistry
from fluxserve.settings import Settings
from tests.conftest import API_KEY, AUTH
from tests.support.fakes import FakeEngine
from tests.support.polling import wait_for


def _wait_feed(client: TestClient, job_id: str, headers: dict[str, str] = AUTH) -> dict[str, Any]:
    def feed() -> dict[str, Any]:
        return client.get(f"/vmodel/feed/{job_id}", headers=headers).json()  # type: ignore[no-any-return]

    return wait_for(feed, lambda body: body["status"] in ("succeeded", "failed"), interval=0.02)


def test_b64_images_spliced_into_json_stay_valid_with_any_prompt(client: TestClient) -> None:
    from fluxserve.outputs import read_metadata

    prompt = 'say "hi" \\ ünï 😀 "b64_json": "x-0" </script>'
    body = {"prompt": prompt, "n": 3, "size": "256x256", "seed": 5, "response_format": "b64_json"}
    resp = client.post("/v1/images/generations", json=body, headers=AUTH)
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
    data = resp.json()["data"]
    assert [d["revised_prompt"] for d in data] == [prompt] * 3
    seeds = [read_metadata(base64.b64decode(d["b64_json"]))["seed"] for d in data]
    assert seeds == [d["seed"] for d in data] and len(set(seeds)) == 3


def test_generation_url_and_b64(client: TestClient) -> None:
    resp = client.post("/v1/images/generations", json={"prompt": "a cat", "n": 2, "size": "512x256"}, headers=AUTH)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert isinstance(body["created"], int) and body["size"] == "512x256"
    assert [d["revised_prompt"] for d in body["data"]] == ["a cat", "a cat"]
    url = body["data"][0]["url"]
    assert url.startswith("http://127.0.0.1:8123/files/")
    img = client.get(url.removeprefix("http://127.0.0.1:8123"))
    assert img.status_code == 200 and img.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(img.content)).size == (512, 256)

    resp = client.post(
        "/v1/images/generations",
        json={"prompt": "a cat", "response_format": "b64_json", "output_format": "webp", "quality": "hd", "x": 1},
        headers=AUTH,
    )
    data = resp.json()["data"][0]
    assert "url" not in data
    decoded = Image.open(io.BytesIO(base64.b64decode(data["b64_json"])))
    assert decoded.format == "WEBP" and decoded.size == (1024, 1024)


def test_vmodel_flow_echoes_input_and_reports_seeds(client: TestClient, fake_engine: FakeEngine) -> None:
    inp = {"prompt": "空气", "num_outputs": 2, "aspect_ratio": "16:9", "output_format": "jpg", "seed": 1900004}
    resp = client.post("/vmodel/generate", json={"model": "flux-schnell", "input": inp}, headers=AUTH)
    assert resp.status_code == 200 and set(resp.json()) == {"id"}
    job_id = resp.json()["id"]
    assert len(job_id) == 26
    body = _wait_feed(client, job_id)
    assert body["status"] == "succeeded" and body["error"] is None
    assert body["model"] == "flux-schnell" and body["input"] == inp
    assert [u.split("?")[0].rsplit("/", 1)[1] for u in body["output"]] == ["out-0.jpg", "out-1.jpg"]
    assert body["seeds"] == [1900004, 1900005]
    assert body["progress"] == {"step": 4, "total": 4}
    spec = fake_engine.last_spec
    assert (spec.width, spec.height, spec.output_format, spec.quality) == (1344, 768, "jpeg", 80)


def test_megapixels_and_steps_reach_the_engine(client: TestClient, fake_engine: FakeEngine) -> None:
    inp = {"prompt": "p", "megapixels": "0.25", "aspect_ratio": "9:16", "num_inference_steps": 12, "guidance": 4.5}
    job_id = client.post("/vmodel/generate", json={"model": "flux-dev", "input": inp}, headers=AUTH).json()["id"]
    assert _wait_feed(client, job_id)["status"] == "succeeded"
    spec = fake_engine.last_spec
    assert (spec.width, spec.height, spec.steps, spec.guidance) == (384, 672, 12, 4.5)


def test_jobs_are_scoped_to_their_key(settings: Settings, fake_engine: FakeEngine) -> None:
    settings.data_dir.mkdir(parents=True)
    other = create_key(open_store(settings.database), "other")
    with TestClient(create_app(settings, engine=fake_engine)) as client:
        job_id = client.post(
            "/vmodel/generate", json={"model": "flux", "input": {"prompt": "mine"}}, headers=AUTH
        ).json()["id"]
        other_auth = {"Authorization": f"Bearer {other.key}"}
        resp = client.get(f"/vmodel/feed/{job_id}", headers=other_auth)
        assert resp.status_code == 404
        assert _wait_feed(client, job_id)["status"] == "succeeded"


def test_file_urls_are_signed_and_expire(client: TestClient) -> None:
    job_id = client.post("/vmodel/generate", json={"model": "flux", "input": {"prompt": "p"}}, headers=AUTH).json()[
        "id"
    ]
    url = _wait_feed(client, job_id)["output"][0].removeprefix("http://127.0.0.1:8123")
    assert client.get(url).status_code == 200
    path, query = url.split("?")
    assert client.get(path).status_code == 403
    assert client.get(url.replace("sig=", "sig=0")).status_code == 403
    expires = int(query.split("expires=")[1].split("&")[0])
    assert client.get(url.replace(f"expires={expires}", f"expires={expires + 1}")).status_code == 403
    assert client.get(url.replace(f"expires={expires}", "expires=1")).status_code == 403
    assert client.get("/files/../secret.key?expires=9999999999&sig=x").status_code in (403, 404)


def test_engine_failure_fails_the_job_and_worker_survives(settings: Settings) -> None:
    engine = FakeEngine(fail_with=RuntimeError("boom"))
    with TestClient(create_app(settings, engine=engine)) as client:
        job_id = client.post("/vmodel/generate", json={"model": "flux", "input": {"prompt": "p"}}, headers=AUTH).json()[
            "id"
        ]
        body = _wait_feed(client, job_id)
        assert body["status"] == "failed" and "boom" in body["error"] and body["output"] is None
        resp = client.post("/v1/images/generations", json={"prompt": "p"}, headers=AUTH)
        assert resp.status_code == 500 and "boom" in resp.json()["error"]["message"]
        engine.fail_with = None
        assert client.post("/v1/images/generations", json={"prompt": "p"}, headers=AUTH).status_code == 200


def test_queue_position_and_progress_while_waiting(settings: Settings) -> None:
    engine = FakeEngine(step_s=0.1)
    with TestClient(create_app(settings, engine=engine)) as client:
        ids = [
            client.post("/vmodel/generate", json={"model": "flux", "input": {"prompt": f"p{i}"}}, headers=AUTH).json()[
                "id"
            ]
            for i in range(3)
        ]
        assert engine.started.wait(5)
        last = client.get(f"/vmodel/feed/{ids[2]}", headers=AUTH).json()
        assert last["status"] == "starting" and last["queue_position"] in (1, 2)
        assert client.get("/health").json()["queue_depth"] >= 1
        assert all(_wait_feed(client, i)["status"] == "succeeded" for i in ids)


def test_health_needs_no_key_and_reports_models(client: TestClient) -> None:
    body = wait_for(lambda: client.get("/health").json(), lambda b: b["status"] != "loading", timeout=10)
    assert body["status"] == "ready" and body["models"] == ["fake"] and body["queue_depth"] == 0


def test_models_list_in_openai_shape(client: TestClient) -> None:
    body = client.get("/v1/models", headers=AUTH).json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ModelRegistry.default().names
    assert all(m["object"] == "model" and not m["demo"] for m in body["data"])


def test_cors_preflight_from_any_origin(client: TestClient) -> None:
    resp = client.options(
        "/v1/images/generations",
        headers={
            "Origin": "https://chat.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type,x-custom",
        },
    )
    assert resp.status_code == 200
    assert resp.headers["access-control-allow-origin"] in ("*", "https://chat.example")


def test_output_metadata_has_prompt_seed_model(client: TestClient, settings: Settings) -> None:
    from fluxserve.outputs import read_metadata

    for fmt in ("png", "jpg", "webp"):
        job_id = client.post(
            "/vmodel/generate",
            json={"model": "flux", "input": {"prompt": "meta", "seed": 5, "output_format": fmt}},
            headers=AUTH,
        ).json()["id"]
        _wait_feed(client, job_id)
        out = next(Path(settings.outputs_dir, job_id).iterdir())
        meta = read_metadata(out.read_bytes())
        assert meta["prompt"] == "meta" and meta["seed"] == 5 and meta["model"] == "flux"


def test_idempotency_on_every_create_route(client: TestClient) -> None:
    from tests.support.images_util import png_bytes

    for i, (method, path, kw) in enumerate(
        [
            ("json", "/vmodel/generate", {"json": {"model": "flux", "input": {"prompt": "once"}}}),
            ("json", "/v1/images/generations", {"json": {"prompt": "once"}}),
            ("form", "/v1/images/edits", {"data": {"prompt": "once"}, "files": {"image": ("a.png", png_bytes())}}),
            ("json", "/v1/flux-dev", {"json": {"prompt": "once"}}),
        ]
    ):
        headers = {**AUTH, "x-key": AUTH["Authorization"].split()[1], "Idempotency-Key": f"key-{i}"}
        first = client.post(path, headers=headers, **kw)  # type: ignore[arg-type]
        second = client.post(path, headers=headers, **kw)  # type: ignore[arg-type]
        other = client.post(path, headers={**headers, "Idempotency-Key": f"other-{i}"}, **kw)  # type: ignore[arg-type]
        assert first.status_code == second.status_code == other.status_code == 200, (method, first.text)
        # The replay is the same job (same id, or for OpenAI's images the same output files); another key is not.
        assert _job_of(first) == _job_of(second) != _job_of(other)


def test_idempotency_covers_the_image_bytes(client: TestClient) -> None:
    """Same key, same fields, another image: a 409 in each dialect, never the first job's result."""
    from tests.support.images_util import png_bytes

    red, blue = png_bytes(color=(200, 30, 30)), png_bytes(color=(30, 30, 200))
    big = Image.frombytes("RGB", (400, 400), random.Random(1).randbytes(400 * 400 * 3))  # too big to echo
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    big_url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    big.putpixel((200, 200), (0, 0, 0))
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    big_url2 = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    assert big_url[:60] == big_url2[:60] and len(big_url) > 256 * 1024

    def edits(img: bytes) -> dict[str, Any]:
        return {"data": {"prompt": "same"}, "files": {"image": ("a.png", img)}}

    def bfl(url: str) -> dict[str, Any]:
        return {"json": {"prompt": "same", "input_image": url}}

    def replicate(url: str) -> dict[str, Any]:
        return {"json": {"input": {"prompt": "same", "image": url}}}

    cases = [
        ("/v1/images/edits", edits(red), edits(blue)),
        ("/v1/flux-kontext-pro", bfl(big_url), bfl(big_url2)),
        ("/v1/models/black-forest-labs/flux-dev/predictions", replicate(big_url), replicate(big_url2)),
    ]
    for i, (path, first_kw, second_kw) in enumerate(cases):
        headers = {**AUTH, "x-key": AUTH["Authorization"].split()[1], "Idempotency-Key": f"img-{i}"}
        first = client.post(path, headers=headers, **first_kw)
        assert first.status_code in (200, 201), (path, first.text)
        same = client.post(path, headers=headers, **first_kw)
        assert _job_of(same) == _job_of(first), path
        other = client.post(path, headers=headers, **second_kw)
        assert other.status_code == 409, (path, other.status_code, other.text[:200])


def _job_of(resp: Any) -> object:
    body = resp.json()
    return body["id"] if "id" in body else [d["url"].split("?")[0] for d in body["data"]]


def test_a_job_is_read_only_through_its_own_dialect(client: TestClient) -> None:
    openai_job = client.post("/v1/images/generations", json={"prompt": "p", "size": "256x256"}, headers=AUTH)
    assert openai_job.status_code == 200
    replicate = client.post(
        "/v1/models/black-forest-labs/flux-schnell/predictions", json={"input": {"prompt": "p"}}, headers=AUTH
    ).json()
    # The relay feed must not try to render another dialect's job (it has no relay input to echo).
    assert client.get(f"/vmodel/feed/{replicate['id']}", headers=AUTH).status_code == 404
    bfl = client.post("/v1/flux-dev", json={"prompt": "p"}, headers={"x-key": AUTH["Authorization"].split()[1]}).json()
    assert client.get(f"/vmodel/feed/{bfl['id']}", headers=AUTH).status_code == 404
    assert client.get(f"/v1/predictions/{bfl['id']}", headers=AUTH).status_code == 404


def test_no_input_files_are_left_by_refused_or_replayed_creates(settings: Settings, client: TestClient) -> None:
    """Inputs are stored for a valid request; a 409, a 429 or an idempotent replay deletes its copies at once."""
    from fluxserve.auth import create_key
    from fluxserve.limits import Limits
    from fluxserve.migrations import open_store
    from tests.support.images_util import png_bytes

    inputs_dir = settings.outputs_dir / "inputs"

    def folders() -> int:
        return len(list(inputs_dir.iterdir())) if inputs_dir.is_dir() else 0

    url = "data:image/png;base64," + base64.b64encode(png_bytes((96, 64))).decode()
    other = "data:image/png;base64," + base64.b64encode(png_bytes((96, 64), (1, 2, 3))).decode()
    headers = {**AUTH, "Idempotency-Key": "inputs-once"}
    body = {"input": {"prompt": "p", "image": url}}
    path = "/v1/models/black-forest-labs/flux-dev/predictions"
    assert client.post(path, json=body, headers=headers).status_code == 201
    assert folders() == 1
    assert client.post(path, json=body, headers=headers).status_code == 201  # replay: same job, no new copy
    assert folders() == 1
    conflict = client.post(path, json={"input": {"prompt": "p", "image": other}}, headers=headers)
    assert conflict.status_code == 409 and folders() == 1
    store = open_store(settings.database)
    limited = create_key(store, "limited")
    store.set_key_limits(limited.id, Limits(rpm=1))
    store.close()
    bearer = {"Authorization": f"Bearer {limited.key}"}
    assert client.post(path, json=body, headers=bearer).status_code == 201
    assert folders() == 2
    assert client.post(path, json=body, headers=bearer).status_code == 429
    assert folders() == 2


def test_a_file_signature_with_non_ascii_characters_is_a_403(client: TestClient) -> None:
    # Found by schemathesis: hmac.compare_digest raised on a non-ASCII str (a 500).
    resp = client.get("/files/abc/out-0.png?expires=9999999999&sig=%F2%9B%A6%88u")
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "invalid_signature"


def test_aliases_clients_hard_code_map_to_a_registry_name(
    settings: Any, fake_engine: FakeEngine, tmp_path: Path
) -> None:
    import openai

    config = tmp_path / "models.toml"
    config.write_text('[aliases]\n"dall-e-3" = "flux-dev"\n"gpt-image-1" = "flux-kontext-pro"\n')
    with TestClient(create_app(settings.model_copy(update={"model_config_file": config}), engine=fake_engine)) as c:
        sdk = openai.OpenAI(api_key=API_KEY, base_url="http://testserver/v1", http_client=c, max_retries=0)
        out = sdk.images.generate(model="dall-e-3", prompt="an alias", size="1024x1024", response_format="b64_json")
        assert out.data is not None and out.data[0].b64_json
        assert fake_engine.calls[-1][0].spec.model == "flux-dev"  # what ran
        listed = {m["id"]: m for m in c.get("/v1/models", headers=AUTH).json()["data"]}
        assert listed["dall-e-3"]["alias_of"] == "flux-dev" and "alias_of" not in listed["flux-dev"]
        assert listed["gpt-image-1"]["kind"] == "kontext"
    # Off by default: no config, no alias.
    with TestClient(create_app(settings, engine=fake_engine)) as c:
        resp = c.post("/v1/images/generations", json={"prompt": "p", "model": "dall-e-3"}, headers=AUTH)
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "model_not_found"
    config.write_text('[aliases]\n"dall-e-2" = "no-such-model"\n')
    with pytest.raises(ValueError, match="not configured"):
        ModelRegistry.from_toml(config)


def test_a_stream_outlasts_the_body_idle_timeout(settings: Settings) -> None:
    # The 408 deadline is for a body that stops arriving; it used to wrap the response's disconnect
    # listener too, so a stream (or Prefer: wait) longer than it was cut and its job canceled.
    import httpx_sse

    engine = FakeEngine(step_s=0.1)
    with TestClient(create_app(settings.model_copy(update={"body_idle_timeout_s": 0.5}), engine=engine)) as c:
        body = {"prompt": "s", "model": "flux-dev", "steps": 15, "size": "256x256", "stream": True}
        with httpx_sse.connect_sse(c, "POST", "/v1/images/generations", json=body, headers=AUTH) as source:
            kinds = [sse.event for sse in source.iter_sse()]
        assert kinds[-1] == "image_generation.completed", kinds
        wait = {"input": {"prompt": "w", "num_inference_steps": 15}}
        held = c.post(
            "/v1/models/black-forest-labs/flux-dev/predictions", json=wait, headers={**AUTH, "Prefer": "wait=10"}
        )
        assert held.status_code == 201 and held.json()["status"] == "succeeded"
