"""LoRA adapters: where they come from, what is refused, every dialect's fields (FakeEngine)."""

import asyncio
import os
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from fluxserve.app import create_app
from fluxserve.errors import InvalidInput, StoreUnavailable
from fluxserve.loras import LoraLibrary, LoraRequest
from fluxserve.models import ModelRegistry
from fluxserve.settings import Settings
from tests.conftest import API_KEY, AUTH
from tests.support.fakes import FakeEngine
from tests.support.image_server import serve_loopback

KLEIN = ModelRegistry.default().get("flux-2-klein-4b")
DEV = ModelRegistry.default().get("flux-dev")


def _library(lora_dir: Path, tmp_path: Path, **kw: Any) -> LoraLibrary:
    args: dict[str, Any] = {"cache_bytes": 10**9, "max_bytes": 10**8, "offline": True, "allow_private": False}
    return LoraLibrary(lora_dir, tmp_path / "cache", **{**args, **kw})


def _resolve(lib: LoraLibrary, source: str, model: Any = KLEIN, scale: float = 1.0) -> Any:
    return asyncio.run(lib.resolve([LoraRequest(source, scale, "loras[0].path")], model))


def test_local_names_files_and_folders(lora_dir: Path, tmp_path: Path) -> None:
    lib = _library(lora_dir, tmp_path)
    [a] = _resolve(lib, "klein-style")
    [b] = _resolve(lib, "klein-style.safetensors", scale=0.5)
    [c] = _resolve(lib, "characters/klein-hero")
    assert a.digest == b.digest and a.path == str(lora_dir / "klein-style.safetensors") and b.scale == 0.5
    assert c.path.endswith("klein-hero/pytorch_lora_weights.safetensors") and c.digest != a.digest
    assert a.name.startswith("lora_") and a.name.isidentifier()
    names = {x["name"]: x for x in lib.available()}
    assert set(names) == {"klein-style", "characters/klein-hero/pytorch_lora_weights", "flux1-style"}
    assert names["klein-style"]["family"] == "FLUX.2" and names["flux1-style"]["family"] == "FLUX.1"


@pytest.mark.parametrize(
    ("source", "model", "code", "words"),
    [
        ("pickled.bin", KLEIN, "invalid_lora", ["pickle", "only .safetensors"]),
        ("broken", KLEIN, "invalid_lora", ["not a safetensors file"]),
        ("flux1-style", KLEIN, "lora_model_mismatch", ["FLUX.1 adapter", "flux-2-klein-4b is a FLUX.2 model"]),
        ("klein-style", DEV, "lora_model_mismatch", ["FLUX.2 adapter", "flux-dev is a FLUX.1 model"]),
        ("../outside", KLEIN, "invalid_value", ["outside the LoRA folder"]),
        ("characters/../../x.safetensors", KLEIN, "invalid_value", ["outside the LoRA folder"]),
        ("/etc/passwd", KLEIN, "invalid_value", ["not a path"]),
        ("no-such-style", KLEIN, "invalid_value", ["no adapter 'no-such-style'", "klein-style"]),
        ("someone/not-cached", KLEIN, "invalid_value", ["not in the local cache", "offline"]),
        ("ftp://example.com/a.safetensors", KLEIN, "invalid_value", ["only https URLs"]),
        ("https://127.0.0.1/a.safetensors", KLEIN, "invalid_lora_url", ["public"]),
        ("http://169.254.169.254/latest", KLEIN, "invalid_lora_url", ["public"]),
    ],
)
def test_refused_adapters_say_why(
    lora_dir: Path, tmp_path: Path, source: str, model: Any, code: str, words: list[str]
) -> None:
    with pytest.raises(InvalidInput) as err:
        _resolve(_library(lora_dir, tmp_path), source, model)
    assert err.value.param == "loras[0].path" and err.value.code == code, err.value.message
    assert all(w in err.value.message for w in words), err.value.message


def test_urls_are_fetched_once_per_content_and_the_cache_evicts_the_least_recent(
    lora_dir: Path, tmp_path: Path
) -> None:
    files = {
        f"/{p.name}": p.read_bytes()
        for p in (
            lora_dir / "klein-style.safetensors",
            lora_dir / "characters/klein-hero/pytorch_lora_weights.safetensors",
            lora_dir / "pickled.bin",
        )
    }
    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            body = files.get(self.path)
            self.send_response(200 if body else 404)
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args: object) -> None:
            pass

    size = len(files["/klein-style.safetensors"])
    lib = _library(None, tmp_path, allow_private=True, cache_bytes=size + 10)  # type: ignore[arg-type]
    with serve_loopback(Handler) as base:
        [a] = _resolve(lib, f"{base}/klein-style.safetensors")
        [b] = _resolve(lib, f"{base}/klein-style.safetensors")
        assert a.digest == b.digest and Path(a.path).parent == tmp_path / "cache"
        assert a.digest == _resolve(_library(lora_dir, tmp_path / "x"), "klein-style")[0].digest
        [c] = _resolve(lib, f"{base}/pytorch_lora_weights.safetensors")
        assert not Path(a.path).exists() and Path(c.path).exists()  # over the cap: the older one went
        with pytest.raises(InvalidInput, match="not a safetensors file"):
            _resolve(lib, f"{base}/pickled.bin")
        with pytest.raises(InvalidInput, match="HTTP 404"):
            _resolve(lib, f"{base}/missing.safetensors")
        small = _library(None, tmp_path / "s", allow_private=True, max_bytes=1000)  # type: ignore[arg-type]
        with pytest.raises(InvalidInput, match="larger than 1000 bytes"):
            _resolve(small, f"{base}/klein-style.safetensors")
        # An unwritable cache (a full disk takes the same path): 503, the request was fine.
        (tmp_path / "blocked").write_text("a file where the cache folder should be")
        unwritable = LoraLibrary(
            None, tmp_path / "blocked" / "cache", cache_bytes=10**9, max_bytes=10**8, offline=True, allow_private=True
        )
        with pytest.raises(StoreUnavailable, match="could not store the adapter"):
            _resolve(unwritable, f"{base}/klein-style.safetensors")
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".fetch-")]


@pytest.fixture
def client(lora_dir: Path, tmp_path: Path, fake_engine: FakeEngine) -> Iterator[TestClient]:
    settings = Settings(data_dir=tmp_path / "data", api_key=API_KEY, port=8123, lora_dir=lora_dir)
    with TestClient(create_app(settings, engine=fake_engine)) as c:
        yield c


def _wait_spec(client: TestClient, fake: FakeEngine, job_id: str) -> Any:
    for _ in range(500):
        if client.get(f"/vmodel/feed/{job_id}", headers=AUTH).json()["status"] == "succeeded":
            return fake.last_spec
    raise AssertionError("job did not finish")


def test_every_dialect_takes_adapters(client: TestClient, fake_engine: FakeEngine, lora_dir: Path) -> None:
    body = {
        "model": "flux-2-klein-4b",
        "prompt": "p",
        "loras": [{"path": "klein-style", "scale": 0.7}, {"path": "characters/klein-hero"}],
    }
    assert client.post("/v1/images/generations", json=body, headers=AUTH).status_code == 200
    spec = fake_engine.last_spec
    assert [(a.source, a.scale) for a in spec.loras] == [("klein-style", 0.7), ("characters/klein-hero", 1.0)]
    form = {"model": "flux-2-klein-4b", "prompt": "p", "loras": '[{"path": "klein-style", "scale": -0.5}]'}
    files = [("image[]", ("a.png", _png(), "image/png"))]
    assert client.post("/v1/images/edits", data=form, files=files, headers=AUTH).status_code == 200
    assert [(a.source, a.scale) for a in fake_engine.last_spec.loras] == [("klein-style", -0.5)]
    inp = {"prompt": "p", "lora_weights": "flux1-style", "lora_scale": 1.5}
    resp = client.post("/vmodel/generate", json={"model": "flux-dev", "input": inp}, headers=AUTH)
    assert resp.status_code == 200, resp.text
    spec = _wait_spec(client, fake_engine, resp.json()["id"])
    assert [(a.source, a.scale) for a in spec.loras] == [("flux1-style", 1.5)]
    for name, model in [("flux-dev-lora", "flux-dev"), ("flux-schnell-lora", "flux-schnell")]:
        inp = {
            "prompt": "p",
            "lora_weights": "flux1-style",
            "lora_scale": 0.8,
            "extra_lora": "flux1-style.safetensors",
            "extra_lora_scale": 0.2,
        }
        resp = client.post(
            f"/v1/models/black-forest-labs/{name}/predictions",
            headers={**AUTH, "Prefer": "wait=30"},
            json={"input": inp},
        )
        assert resp.status_code == 201 and resp.json()["status"] == "succeeded", resp.text
        spec = fake_engine.last_spec
        assert spec.model == model and [a.scale for a in spec.loras] == [0.8, 0.2]
        assert "Using LoRA flux1-style" in resp.json()["logs"]
    klein = {"input": {"prompt": "p", "lora_weights": "klein-style"}}
    resp = client.post(
        "/v1/models/black-forest-labs/flux-2-klein-4b/predictions", json=klein, headers={**AUTH, "Prefer": "wait=30"}
    )
    assert resp.status_code == 201 and fake_engine.last_spec.loras[0].source == "klein-style"


def _png() -> bytes:
    from tests.support.images_util import png_bytes

    return png_bytes((256, 256))


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        (
            "/v1/images/generations",
            {"model": "flux-2-klein-4b", "prompt": "p", "loras": [{"path": "klein-style"}] * 4},
            400,
            "loras",
        ),
        (
            "/v1/images/generations",
            {"model": "flux-2-klein-4b", "prompt": "p", "loras": [{"path": "klein-style", "scale": 3.5}]},
            400,
            "loras[0].scale",
        ),
        (
            "/v1/images/generations",
            {"model": "flux-2-klein-4b", "prompt": "p", "loras": [{"path": "pickled.bin"}]},
            400,
            "loras[0].path",
        ),
        (
            "/v1/images/generations",
            {"model": "flux-2-klein-4b", "prompt": "p", "loras": [{"path": "flux1-style"}]},
            400,
            "loras[0].path",
        ),
        (
            "/v1/images/generations",
            {"model": "flux-2-klein-4b", "prompt": "p", "loras": [{"file": "x"}]},
            400,
            "loras.0.path",
        ),
        (
            "/v1/images/generations",
            {"model": "flux-2-klein-4b", "prompt": "p", "loras": [{"path": "../../etc"}]},
            400,
            "loras[0].path",
        ),
        (
            "/vmodel/generate",
            {"model": "flux-dev", "input": {"prompt": "p", "lora_weights": "flux1-style", "lora_scale": -2}},
            400,
            "input.lora_scale",
        ),
        (
            "/v1/models/black-forest-labs/flux-dev-lora/predictions",
            {"input": {"prompt": "p", "lora_weights": "klein-style"}},
            422,
            "input.lora_weights",
        ),
        (
            "/v1/models/black-forest-labs/flux-dev-lora/predictions",
            {"input": {"prompt": "p", "lora_weights": "flux1-style", "extra_lora": "https://10.0.0.1/x.safetensors"}},
            422,
            "input.extra_lora",
        ),
    ],
)
def test_bad_adapter_requests(client: TestClient, path: str, body: dict[str, Any], status: int, param: str) -> None:
    resp = client.post(path, json=body, headers=AUTH)
    assert resp.status_code == status, resp.text
    got = resp.json()["error"]["param"] if status == 400 else resp.json()["invalid_fields"][0]["field"]
    assert got == param, resp.text


def test_edit_form_loras_must_be_json(client: TestClient) -> None:
    form = {"model": "flux-2-klein-4b", "prompt": "p", "loras": "klein-style"}
    resp = client.post("/v1/images/edits", data=form, files=[("image", ("a.png", _png(), "image/png"))], headers=AUTH)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "loras"


def test_the_list_of_adapters(client: TestClient) -> None:
    body = client.get("/v1/loras", headers=AUTH).json()
    assert {a["name"] for a in body["data"]} >= {"klein-style", "flux1-style"}
    assert body["limits"] == {"max_per_request": 3, "min_scale": -1.0, "max_scale": 3.0}
    assert client.get("/v1/loras").status_code == 401
    assert os.environ.get("HF_HUB_OFFLINE", "1")  # nothing here may reach the hub


def test_batches_group_only_the_same_adapters_and_jobs_keep_them(lora_dir: Path, tmp_path: Path) -> None:
    from fluxserve.spec import GenerationSpec

    [a] = _resolve(_library(lora_dir, tmp_path), "klein-style")
    make = KLEIN.make_spec
    plain = make(prompt="p", width=512, height=512, seed=1)
    styled = make(prompt="q", width=512, height=512, seed=2, loras=(a,))
    other_scale = make(prompt="q", width=512, height=512, seed=3, loras=(replace(a, scale=0.5),))
    assert len({plain.batch_key(), styled.batch_key(), other_scale.batch_key()}) == 3
    assert styled.batch_key() == make(prompt="r", width=512, height=512, seed=9, loras=(a,)).batch_key()
    assert GenerationSpec.from_dict(styled.to_dict()) == styled  # as the job row stores it


def test_compiled_servers_take_adapters_only_through_hot_swap_slots(
    lora_dir: Path, tmp_path: Path, fake_engine: FakeEngine
) -> None:
    body = {"model": "flux-2-klein-4b", "prompt": "p", "loras": [{"path": "klein-style"}]}
    for rank, status, code in [(0, 400, "loras_unavailable"), (4, 400, "invalid_lora"), (8, 200, None)]:
        settings = Settings(
            data_dir=tmp_path / f"d{rank}", api_key=API_KEY, lora_dir=lora_dir, compile=True, lora_max_rank=rank
        )
        with TestClient(create_app(settings, engine=fake_engine)) as client:
            resp = client.post(
                "/v1/images/generations", json={**body, "loras": [{"path": "characters/klein-hero"}]}, headers=AUTH
            )
            assert resp.status_code == status, resp.text
            if code:
                assert resp.json()["error"]["code"] == code and resp.json()["error"]["param"] == "loras[0].path"


def test_a_worker_on_another_machine_fetches_the_adapter_an_api_node_checked(lora_dir: Path, tmp_path: Path) -> None:
    body = {"data": (lora_dir / "klein-style.safetensors").read_bytes()}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body["data"])

        def log_message(self, *args: object) -> None:
            pass

    api = _library(None, tmp_path / "api", allow_private=True)  # type: ignore[arg-type]
    worker = _library(None, tmp_path / "worker", allow_private=True)  # type: ignore[arg-type]
    with serve_loopback(Handler) as base:
        [checked] = _resolve(api, f"{base}/style.safetensors", scale=0.7)
        assert worker.localize((checked,), KLEIN) == (checked,)  # the same machine: the file is there
        Path(checked.path).unlink()  # another machine: its cache does not have the API node's file
        [here] = worker.localize((checked,), KLEIN)
        assert here.digest == checked.digest and here.scale == 0.7 and Path(here.path).is_file()
        assert Path(here.path).parent == tmp_path / "worker" / "cache"
        # The URL now serves another file: the job's adapter is not silently swapped.
        body["data"] = (lora_dir / "characters/klein-hero/pytorch_lora_weights.safetensors").read_bytes()
        Path(here.path).unlink()
        with pytest.raises(InvalidInput, match="changed since the job was accepted"):
            worker.localize((checked,), KLEIN)


class _FakeHub:
    """The two hub routes a LoRA fetch uses: /api/models/{repo} (files with sizes) and /{repo}/resolve/main/{file}."""

    def __init__(self, weights: bytes, *, listed_size: int | None = None, delay_s: float = 0.0) -> None:
        self.weights, self.listed_size, self.delay_s = weights, listed_size, delay_s
        self.paths: list[str] = []

    def handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                import json
                import time

                hub.paths.append(self.path)
                if self.path.startswith("/api/models/"):
                    time.sleep(hub.delay_s)
                    size = hub.listed_size if hub.listed_size is not None else len(hub.weights)
                    siblings = [
                        {"rfilename": "pytorch_lora_weights.safetensors", "size": size},
                        {"rfilename": "README.md", "size": 10},
                        {"rfilename": "big.ckpt", "size": 10**10},
                    ]
                    body = json.dumps({"id": "acme/style", "sha": "0" * 40, "siblings": siblings}).encode()
                    ctype = "application/json"
                elif self.path == "/acme/style/resolve/main/pytorch_lora_weights.safetensors":
                    body, ctype = hub.weights, "application/octet-stream"
                else:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        return Handler


def _online(lora_dir: Path, tmp_path: Path, hub: _FakeHub, base: str, **kw: Any) -> LoraLibrary:
    lib = _library(lora_dir, tmp_path, offline=False, allow_private=True, **kw)  # the fake hub is on loopback
    lib.hub_endpoint = base
    return lib


def test_a_hub_adapter_is_one_file_fetched_into_the_capped_cache(lora_dir: Path, tmp_path: Path) -> None:
    hub = _FakeHub((lora_dir / "klein-style.safetensors").read_bytes())
    with serve_loopback(hub.handler()) as base:
        [a] = _resolve(_online(lora_dir, tmp_path, hub, base), "acme/style")
    assert Path(a.path).parent == tmp_path / "cache" and Path(a.path).read_bytes() == hub.weights
    # Only the listing and the one adapter file: no snapshot of the repo (its 10 GB checkpoint stays there).
    assert [p.split("?")[0] for p in hub.paths] == [
        "/api/models/acme/style",
        "/acme/style/resolve/main/pytorch_lora_weights.safetensors",
    ]


def test_a_hub_adapter_past_the_cap_is_refused_unfetched(lora_dir: Path, tmp_path: Path) -> None:
    from fluxserve.errors import PayloadTooLarge

    hub = _FakeHub(b"x", listed_size=10**9)
    with serve_loopback(hub.handler()) as base, pytest.raises(PayloadTooLarge, match="at most 100000000 bytes"):
        _resolve(_online(lora_dir, tmp_path, hub, base), "acme/style")
    assert not any("resolve" in p for p in hub.paths)


def test_a_slow_hub_answer_has_a_deadline(lora_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from fluxserve import loras

    monkeypatch.setattr(loras, "HUB_METADATA_S", 0.5)
    hub = _FakeHub(b"x", delay_s=3.0)
    with serve_loopback(hub.handler()) as base:
        start = time.monotonic()
        with pytest.raises(InvalidInput, match=r"did not describe 'acme/style' within 0\.5 s"):
            _resolve(_online(lora_dir, tmp_path, hub, base), "acme/style")
        assert time.monotonic() - start < 2.5
