"""The rest of the relay's surface over the HTTP and job layers (FakeEngine): provider prefixes and
OpenAI's async mode."""

from __future__ import annotations

import time
from typing import Any

from fastapi.testclient import TestClient

from tests.conftest import API_KEY, AUTH
from tests.support.images_util import png_bytes

BASE = "http://127.0.0.1:8123"


def _until(client: TestClient, url: str, done: Any, headers: dict[str, str] = AUTH) -> dict[str, Any]:
    deadline = time.time() + 10
    while time.time() < deadline:
        body: dict[str, Any] = client.get(url.removeprefix(BASE), headers=headers).json()
        if done(body):
            return body
        time.sleep(0.02)
    raise AssertionError(body)


def test_bfl_under_its_prefix_with_bearer_or_x_key(client: TestClient) -> None:
    for headers in (AUTH, {"x-key": API_KEY}):
        created = client.post("/bfl/v1/flux-kontext-pro", json={"prompt": "p"}, headers=headers)
        assert created.status_code == 200, created.text
        job_id = created.json()["id"]
        got = _until(client, f"/bfl/v1/get_result?id={job_id}", lambda b: b["status"] != "Pending", headers)
        assert got["status"] == "Ready" and got["result"]["sample"]
    bad = client.post("/bfl/v1/flux-kontext-pro", json={"prompt": ""}, headers=AUTH)
    assert bad.status_code == 422 and "prompt" in bad.text  # BFL's error shape under the prefix too
    assert "detail" in bad.json()


def test_replicate_under_its_prefix(client: TestClient) -> None:
    created = client.post(
        "/replicate/v1/models/black-forest-labs/flux-schnell/predictions",
        json={"input": {"prompt": "p"}},
        headers={**AUTH, "Prefer": "wait=10"},
    )
    assert created.status_code in (200, 201), created.text
    pred = created.json()
    assert pred["status"] == "succeeded"
    again = client.get(f"/replicate/v1/predictions/{pred['id']}", headers=AUTH).json()
    assert again["id"] == pred["id"]
    problem = client.get("/replicate/v1/predictions/nope", headers=AUTH)
    assert problem.status_code == 404 and problem.json()["title"]  # Replicate's problem details


def test_a_prefix_reaches_only_its_own_dialect(client: TestClient) -> None:
    body = {"model": "flux-schnell", "prompt": "p"}
    assert client.post("/bfl/v1/images/generations", json=body, headers=AUTH).status_code == 404
    assert client.get("/replicate/v1/images/tasks/x", headers=AUTH).status_code == 404
    assert client.get("/bfl/health").status_code == 404


def test_openai_async_mode_returns_a_task_to_poll(client: TestClient) -> None:
    created = client.post(
        "/v1/images/generations", json={"model": "flux-schnell", "prompt": "p", "async": True}, headers=AUTH
    )
    assert created.status_code == 202, created.text
    task = created.json()
    assert task["task_id"] == task["id"] and task["status"] in ("queued", "in_progress", "completed")
    done = _until(client, f"/v1/images/tasks/{task['id']}", lambda b: b["status"] == "completed")
    assert done["data"][0]["url"].startswith(BASE) and done["error"] is None and done["progress"] == 100
    prefer = client.post(
        "/v1/images/generations",
        json={"model": "flux-schnell", "prompt": "p"},
        headers={**AUTH, "Prefer": "respond-async"},
    )
    assert prefer.status_code == 202
    edit = client.post(
        "/v1/images/edits",
        data={"model": "flux-kontext-pro", "prompt": "p", "async": "true"},
        files=[("image[]", ("a.png", png_bytes((64, 64)), "image/png"))],
        headers=AUTH,
    )
    assert edit.status_code == 202, edit.text
    assert _until(client, f"/v1/images/tasks/{edit.json()['id']}", lambda b: b["status"] == "completed")["data"]
    assert client.get("/v1/images/tasks/nope", headers=AUTH).status_code == 404
    wrong = client.post("/v1/images/generations", json={"prompt": "p", "async": "yes"}, headers=AUTH)
    assert wrong.status_code == 400 and "async" in wrong.text


def _basic(key: str = API_KEY, user: str = "webui") -> dict[str, str]:
    import base64

    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{key}".encode()).decode()}


def test_a1111_as_open_webui_calls_it(client: TestClient, fake_engine: Any) -> None:
    import base64
    import json

    models = client.get("/sdapi/v1/sd-models", headers=_basic()).json()
    assert {"flux-schnell", "flux-dev"} <= {m["title"] for m in models} and all("model_name" in m for m in models)
    assert (
        client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "flux-dev"}, headers=_basic()).status_code == 200
    )
    assert client.get("/sdapi/v1/options", headers=_basic()).json()["sd_model_checkpoint"] == "flux-dev"
    # Open WebUI's txt2img body (backend/open_webui/routers/images.py): prompt, batch_size, width, height, steps...
    body = {
        "prompt": "a fox",
        "batch_size": 2,
        "width": 512,
        "height": 256,
        "steps": 10,
        "negative_prompt": "blurry",
        "cfg_scale": 4.5,
        "sampler_name": "Euler a",
        "seed": 42,
    }
    got = client.post("/sdapi/v1/txt2img", json=body, headers=_basic())
    assert got.status_code == 200, got.text
    answer = got.json()
    assert len(answer["images"]) == 2 and base64.b64decode(answer["images"][0])[:4] == b"\x89PNG"
    info = json.loads(answer["info"])
    assert (
        info["all_seeds"] == [42, 43] and info["sd_model_name"] == "flux-dev" and "negative_prompt" in info["comments"]
    )
    spec = fake_engine.last_spec
    assert (spec.model, spec.width, spec.height, spec.steps, spec.guidance) == ("flux-dev", 512, 256, 10, 4.5)
    progress = client.get("/sdapi/v1/progress", headers=AUTH).json()
    assert progress["state"]["job_count"] == 0 and progress["progress"] == 0.0
    img = base64.b64encode(png_bytes((256, 256))).decode()
    i2i = client.post(
        "/sdapi/v1/img2img",
        json={
            "prompt": "night",
            "init_images": [img],
            "denoising_strength": 0.4,
            "override_settings": {"sd_model_checkpoint": "flux-schnell"},
        },
        headers=AUTH,
    )
    assert i2i.status_code == 200, i2i.text
    assert (fake_engine.last_spec.task, fake_engine.last_spec.strength) == ("img2img", 0.4)
    assert client.post("/sdapi/v1/interrupt", headers=AUTH).status_code == 200


def test_a1111_errors_name_the_field_in_its_shape(client: TestClient) -> None:
    bad = client.post("/sdapi/v1/txt2img", json={"prompt": "p", "width": 100}, headers=AUTH)
    assert bad.status_code == 422 and set(bad.json()) == {"error", "detail", "body", "errors"}
    assert "width" in bad.text
    wrong_model = client.post(
        "/sdapi/v1/txt2img", json={"prompt": "p", "override_settings": {"sd_model_checkpoint": "sdxl"}}, headers=AUTH
    )
    assert wrong_model.status_code == 422 and "sdxl" in wrong_model.json()["errors"]
    assert client.post("/sdapi/v1/txt2img", json={"prompt": "p"}, headers=_basic("wrong")).status_code == 401
    assert (
        client.post("/sdapi/v1/txt2img", json={"prompt": "p"}, headers={"Authorization": "Basic !!"}).status_code == 401
    )
    assert client.post("/sdapi/v1/img2img", json={"prompt": "p", "init_images": []}, headers=AUTH).status_code == 422
    steps = client.post(
        "/sdapi/v1/txt2img",
        json={"prompt": "p", "steps": 20, "override_settings": {"sd_model_checkpoint": "flux-schnell"}},
        headers=AUTH,
    )
    assert steps.status_code == 422 and "steps must be between 1 and 4" in steps.json()["errors"]


FAL_KEY = {"Authorization": f"Key {API_KEY}"}


def test_fal_queue_submit_status_result(client: TestClient, fake_engine: Any) -> None:
    created = client.post(
        "/fal-ai/flux/dev",
        json={
            "prompt": "a fox",
            "image_size": "landscape_16_9",
            "num_inference_steps": 12,
            "guidance_scale": 4,
            "num_images": 2,
            "seed": 9,
            "output_format": "png",
        },
        headers=FAL_KEY,
    )
    assert created.status_code == 200, created.text
    sub = created.json()
    assert set(sub) >= {"request_id", "status_url", "response_url", "cancel_url"}
    assert sub["status_url"] == f"{BASE}/fal-ai/flux/requests/{sub['request_id']}/status"  # fal drops the sub-path
    status = _until(client, sub["status_url"] + "?logs=1", lambda b: b["status"] == "COMPLETED", FAL_KEY)
    assert status["logs"] and status["logs"][0]["message"].startswith("Using seed")
    # fal-client polls with logs=true and reads "logs" on every status (a 422 and a KeyError before).
    as_client = client.get(sub["status_url"].removeprefix(BASE) + "?logs=true", headers=FAL_KEY)
    assert as_client.status_code == 200 and as_client.json()["logs"][0]["message"].startswith("Using seed")
    assert client.get(sub["status_url"].removeprefix(BASE), headers=FAL_KEY).json()["logs"] is None
    result = client.get(sub["response_url"].removeprefix(BASE), headers=FAL_KEY).json()
    assert [(i["width"], i["height"], i["content_type"]) for i in result["images"]] == [(1024, 576, "image/png")] * 2
    assert result["seed"] == 9 and result["has_nsfw_concepts"] == [False, False] and result["prompt"] == "a fox"
    spec = fake_engine.last_spec
    assert (spec.model, spec.steps, spec.guidance) == ("flux-dev", 12, 4)
    assert client.get(sub["response_url"].removeprefix(BASE), headers=AUTH).status_code == 200  # Bearer works too
    other = client.get(f"/fal-ai/flux-pro/requests/{sub['request_id']}", headers=FAL_KEY)
    assert other.status_code == 404  # another app's path does not reach it


def test_fal_sync_mode_kontext_references_and_cancel(client: TestClient, fake_engine: Any) -> None:
    import base64

    ref = "data:image/png;base64," + base64.b64encode(png_bytes((320, 256))).decode()
    body = {"prompt": "night", "image_url": ref, "image_size": {"width": 512, "height": 512}, "sync_mode": True}
    # fal.run (synchronous): the result itself; sync_mode makes its images data URIs.
    sync = client.post("/fal-run/fal-ai/flux-pro/kontext", json=body, headers=FAL_KEY)
    assert sync.status_code == 200, sync.text
    assert sync.json()["images"][0]["url"].startswith("data:image/jpeg;base64,")
    assert sync.headers["x-fal-request-id"]
    # The queue (queue.fal.run) answers a receipt even with sync_mode (fal-client reads request_id); the
    # result it leads to has the data URIs.
    receipt = client.post("/fal-ai/flux-pro/kontext", json=body, headers=FAL_KEY)
    assert receipt.status_code == 200 and receipt.headers["x-fal-request-id"] == receipt.json()["request_id"]
    _until(client, receipt.json()["status_url"], lambda b: b["status"] == "COMPLETED", FAL_KEY)
    fetched = client.get(receipt.json()["response_url"].removeprefix(BASE), headers=FAL_KEY).json()
    assert fetched["images"][0]["url"].startswith("data:image/jpeg;base64,")
    assert fake_engine.last_spec.model == "flux-kontext-pro" and len(fake_engine.last_spec.images) == 1
    queued = client.post("/fal-ai/flux/schnell", json={"prompt": "p"}, headers=FAL_KEY).json()
    cancel = client.put(queued["cancel_url"].removeprefix(BASE), headers=FAL_KEY)
    assert cancel.status_code in (202, 400)  # 400: it had already completed (the fake engine is quick)


def test_fal_errors_name_the_field(client: TestClient) -> None:
    bad = client.post("/fal-ai/flux/dev", json={"prompt": "p", "image_size": "huge"}, headers=FAL_KEY)
    assert bad.status_code == 422 and "image_size" in bad.json()["detail"][0]["loc"]
    steps = client.post("/fal-ai/flux/schnell", json={"prompt": "p", "num_inference_steps": 30}, headers=FAL_KEY)
    assert steps.status_code == 422 and "num_inference_steps" in steps.text
    unknown = client.post("/fal-ai/sdxl", json={"prompt": "p"}, headers=FAL_KEY)
    assert unknown.status_code == 404 and "fal-ai/flux/dev" in unknown.json()["detail"]
    assert (
        client.post("/fal-ai/flux/dev", json={"prompt": "p"}, headers={"Authorization": "Key nope"}).status_code == 401
    )
    hook = client.post("/fal-ai/flux/dev?fal_webhook=http://10.0.0.1/x", json={"prompt": "p"}, headers=FAL_KEY)
    assert hook.status_code == 422 and "fal_webhook" in hook.text


def test_replicate_files_bad_input_and_ownership(client: TestClient, settings: Any) -> None:
    from fluxserve.auth import create_key

    up = client.post(
        "/v1/files",
        files={"content": ("a.png", png_bytes((64, 64)), "image/png")},
        data={"metadata": '{"k": 1}'},
        headers=AUTH,
    )
    assert up.status_code == 201, up.text
    made = up.json()
    assert made["metadata"] == {"k": 1} and made["content_type"] == "image/png" and made["expires_at"]
    download = client.get(f"/v1/files/{made['id']}/download", headers=AUTH)
    assert download.content[:4] == b"\x89PNG"
    assert client.post("/v1/files", json={"content": "x"}, headers=AUTH).status_code == 415
    missing = client.post("/v1/files", files={"other": ("a", b"x")}, headers=AUTH)
    assert missing.status_code == 422 and missing.json()["invalid_fields"][0]["field"] == "content"
    bad_meta = client.post("/v1/files", files={"content": ("a", b"x")}, data={"metadata": "[1]"}, headers=AUTH)
    assert bad_meta.status_code == 422 and "metadata" in bad_meta.text
    # Another key can neither see the file nor name it in a prediction.
    store = client.app.state.services.store  # type: ignore[attr-defined]
    other = {"Authorization": f"Bearer {create_key(store, 'other').key}"}
    assert client.get(f"/v1/files/{made['id']}", headers=other).status_code == 404
    theirs = client.post(
        "/v1/models/black-forest-labs/flux-kontext-pro/predictions",
        json={"input": {"prompt": "p", "input_image": made["urls"]["get"]}},
        headers=other,
    )
    assert theirs.status_code == 422 and "no file" in theirs.text
    mine = client.post(
        "/v1/models/black-forest-labs/flux-kontext-pro/predictions",
        json={"input": {"prompt": "p", "input_image": made["urls"]["get"]}},
        headers={**AUTH, "Prefer": "wait=10"},
    )
    assert mine.json()["status"] == "succeeded", mine.text
    assert client.delete(f"/v1/files/{made['id']}", headers=AUTH).status_code == 204
    assert client.delete(f"/v1/files/{made['id']}", headers=AUTH).status_code == 404


def test_slow_webhook_dns_never_stalls_another_tenants_request(client: TestClient, monkeypatch: Any) -> None:
    """Creates whose webhook host resolves slowly hold threads of their own pool, not the store's or auth's."""
    import threading

    from fluxserve.api import deps
    from fluxserve.auth import create_key

    real = deps.check_webhook_url

    def slow_dns(*args: Any, **kwargs: Any) -> None:
        time.sleep(2.0)
        real(*args, **kwargs)

    monkeypatch.setattr(deps, "check_webhook_url", slow_dns)
    other = {"Authorization": f"Bearer {create_key(client.app.state.services.store, 'other').key}"}  # type: ignore[attr-defined]
    body = {"input": {"prompt": "p"}, "webhook": "https://example.com/hook"}
    url = "/v1/models/black-forest-labs/flux-schnell/predictions"
    creates = [
        threading.Thread(target=client.post, args=(url,), kwargs={"json": body, "headers": AUTH}) for _ in range(6)
    ]
    for t in creates:
        t.start()
    time.sleep(0.3)  # the creates are in their DNS checks now
    start = time.perf_counter()
    listed = client.get("/v1/predictions", headers=other)
    took = time.perf_counter() - start
    for t in creates:
        t.join()
    assert listed.status_code == 200 and took < 1.0, took  # was ~2 s: behind the DNS checks in the store pool


def test_a_synchronous_edit_holds_no_decoded_inputs_while_its_job_runs(settings: Any, monkeypatch: Any) -> None:
    import gc
    import threading
    import weakref

    from fluxserve.api import edits
    from fluxserve.app import create_app
    from tests.support.fakes import FakeEngine

    decoded: list[weakref.ref[Any]] = []
    real = edits.decode_image_async

    async def tracked(*args: Any, **kwargs: Any) -> Any:
        image = await real(*args, **kwargs)
        decoded.append(weakref.ref(image))
        return image

    monkeypatch.setattr(edits, "decode_image_async", tracked)
    engine = FakeEngine(step_s=0.2)
    with TestClient(create_app(settings, engine=engine)) as client:
        files = [("image[]", (f"{i}.png", png_bytes((512, 512), (i, 0, 0)), "image/png")) for i in range(4)]
        answer: list[Any] = []
        call = threading.Thread(
            target=lambda: answer.append(
                client.post(
                    "/v1/images/edits", data={"model": "flux-2-klein-4b", "prompt": "p"}, files=files, headers=AUTH
                )
            )
        )
        call.start()
        assert engine.started.wait(10)
        gc.collect()
        alive = [r for r in decoded if r() is not None]
        call.join(30)
    assert len(decoded) == 4 and alive == []  # was all 4, held until the job ended
    assert answer and answer[0].status_code == 200, answer
