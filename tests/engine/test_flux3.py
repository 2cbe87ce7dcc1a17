"""FLUX 3 Image Klein and FLUX.2 [dev] generating for real: the demo's flux3/, flux3-base/ and flux2-dev/
folders through diffusers' modular FLUX 3 pipelines and Flux2Pipeline, whose processors (Qwen3-VL's,
Pixtral's) need torchvision. These run in the second test venv (torch 2.14.1 + torchvision 0.29.1,
scripts/test.sh); the main one has no torchvision, and there these names are not served."""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from fluxserve.engine.base import Cancelled, EngineRequest
from fluxserve.engine.flux import DiffusersEngine
from fluxserve.errors import InvalidInput
from fluxserve.models import ModelRegistry
from fluxserve.models.demo import demo_weights
from tests.support.images_util import png_bytes

pytestmark = pytest.mark.torchvision
NAMES = ["flux-3-image-klein", "flux-3-image-klein-base", "flux-2-dev", "flux-2-pro"]


@pytest.fixture(scope="module")
def registry(demo_model_dir: Path) -> ModelRegistry:
    return ModelRegistry.demo(demo_model_dir).only(NAMES)


@pytest.fixture(scope="module")
def engine(registry: ModelRegistry) -> DiffusersEngine:
    eng = DiffusersEngine(registry, device="cpu", local_files_only=True)
    eng.load()
    return eng


def _ref(seed: int, size: tuple[int, int] = (192, 160)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3)).astype(np.uint8))


def _req(registry: ModelRegistry, model: str, images: list[Image.Image] | None = None, **kw: Any) -> EngineRequest:
    args: dict[str, Any] = {"prompt": "a lighthouse at dusk", "width": 256, "height": 256, "seed": 11, "steps": 3}
    args.update(kw)
    images = images or []
    spec = registry.get(model).make_spec(images=tuple(f"in/{i}.png" for i in range(len(images))), **args)
    return EngineRequest(spec, images=images)


def _plain_flux3(folder: Path, distilled: bool) -> Any:
    from diffusers.modular_pipelines import Flux3AutoBlocks, Flux3DistilledAutoBlocks

    blocks = (Flux3DistilledAutoBlocks if distilled else Flux3AutoBlocks)()
    blocks.sub_blocks.pop("prompt_upsampler")
    pipe = blocks.init_pipeline(str(folder))
    pipe.load_components(dtype=torch.float32)
    return pipe


def _same(a: Image.Image, b: Image.Image) -> None:
    assert a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


def test_the_demo_serves_each_name_from_its_own_folder(registry: ModelRegistry, demo_model_dir: Path) -> None:
    assert registry.get("flux-3-image-klein").weights == str(demo_model_dir / "flux3")
    assert registry.get("flux-3-image-klein-base").weights == str(demo_model_dir / "flux3-base")
    assert (
        registry.get("flux-2-dev").weights
        == str(demo_model_dir / "flux2-dev")
        != str(demo_weights(demo_model_dir, "flux2"))
    )
    facts = registry.get("flux-3-image-klein").facts()
    assert facts["kind"] == "flux3" and facts["max_images"] == 10 and facts["guidance"] is None
    assert facts["steps"]["default"] == 16 and facts["license"] == "FLUX Kommunity License"
    assert registry.get("flux-3-image-klein-base").facts()["guidance"]["default"] == 4.0


@pytest.mark.parametrize("distilled", [True, False])
@pytest.mark.parametrize("references", [0, 3])
def test_flux3_is_pixel_identical_to_the_plain_modular_pipeline(
    engine: DiffusersEngine, registry: ModelRegistry, demo_model_dir: Path, distilled: bool, references: int
) -> None:
    name = "flux-3-image-klein" if distilled else "flux-3-image-klein-base"
    images = [_ref(i) for i in range(references)]
    steps: list[tuple[int, int]] = []
    [[ours]] = engine.generate([_req(registry, name, images)], lambda d, t, _p: steps.append((d, t)))
    assert steps == [(1, 3), (2, 3), (3, 3)]  # progress from inside the modular loop
    plain = _plain_flux3(demo_model_dir / ("flux3" if distilled else "flux3-base"), distilled)
    kwargs: dict[str, Any] = {"image": images} if images else {}
    if not distilled:
        plain.update_components(guider=plain.guider.new(guidance_scale=4.0))
    [theirs] = plain(
        prompt="a lighthouse at dusk",
        height=256,
        width=256,
        num_inference_steps=3,
        generator=[torch.Generator("cpu").manual_seed(11)],
        output="images",
        **kwargs,
    )
    _same(ours, theirs)


def test_flux3_cancels_between_steps_previews_and_several_images(
    engine: DiffusersEngine, registry: ModelRegistry
) -> None:
    seen: list[int] = []

    def stop_at_2(done: int, _total: int, _p: object) -> None:
        seen.append(done)
        if done == 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        engine.generate([_req(registry, "flux-3-image-klein", steps=8)], stop_at_2)
    assert seen == [1, 2]  # stopped between steps, not at the end
    previews: dict[int, int] = {}
    from dataclasses import replace

    req = _req(registry, "flux-3-image-klein", steps=12, num_images=2)
    req = EngineRequest(replace(req.spec, partial_images=2))  # as an OpenAI stream with partial_images asks

    def keep(done: int, _t: int, p: list[Image.Image] | None) -> None:
        if p is not None:
            previews[done] = len(p)

    [images] = engine.generate([req], keep)
    assert len(images) == 2 and images[0].tobytes() != images[1].tobytes()  # a seed each
    assert previews and set(previews) == set(req.spec.preview_steps()) and set(previews.values()) == {2}
    # The guidance a client sends to the base model is the one used.
    [[a]] = engine.generate([_req(registry, "flux-3-image-klein-base", guidance=2.0)], lambda *_: None)
    [[b]] = engine.generate([_req(registry, "flux-3-image-klein-base", guidance=6.0)], lambda *_: None)
    assert a.tobytes() != b.tobytes()


def test_flux3_requests_are_checked_before_anything_runs(registry: ModelRegistry) -> None:
    from fluxserve.spec import Adapter

    model = registry.get("flux-3-image-klein")
    keys = tuple(f"in/{i}.png" for i in range(11))
    with pytest.raises(InvalidInput, match="at most 10"):
        model.make_spec(prompt="p", width=256, height=256, images=keys)
    with pytest.raises(InvalidInput, match="mask"):
        model.make_spec(prompt="p", width=256, height=256, images=keys[:1], mask="in/m.png")
    with pytest.raises(InvalidInput, match="LoRA") as lora:
        model.make_spec(prompt="p", width=256, height=256, loras=(Adapter("x", "sha", "/x.safetensors", 1.0),))
    assert lora.value.param == "loras"


@pytest.mark.parametrize("references", [0, 3])
def test_flux2_dev_is_pixel_identical_to_plain_flux2pipeline(
    engine: DiffusersEngine, registry: ModelRegistry, demo_model_dir: Path, references: int
) -> None:
    from diffusers import Flux2Pipeline

    images = [_ref(i, (256, 256)) for i in range(references)]
    [[ours]] = engine.generate([_req(registry, "flux-2-dev", images)], lambda *_: None)
    plain = Flux2Pipeline.from_pretrained(demo_model_dir / "flux2-dev", dtype=torch.float32, local_files_only=True)
    assert type(plain.tokenizer).__name__ == "PixtralProcessor"  # the real processor, not a stand-in
    kwargs: dict[str, Any] = {"image": images} if images else {}
    [theirs] = plain(
        prompt="a lighthouse at dusk",
        height=256,
        width=256,
        num_inference_steps=3,
        guidance_scale=4.0,
        generator=[torch.Generator("cpu").manual_seed(11)],
        **kwargs,
    ).images
    _same(ours, theirs)


@pytest.fixture(scope="module")
def client(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    import shutil

    from fluxserve.app import create_app
    from fluxserve.settings import Settings

    data = tmp_path_factory.mktemp("flux3-app")
    shutil.copytree(demo_model_dir, data / "demo-model")
    # Provenance off: these tests compare two jobs' images byte for byte, and each job's watermark is its own.
    settings = Settings(data_dir=data, api_key="test-key-0123456789", demo=True, models=NAMES[:2], provenance="off")
    with TestClient(create_app(settings)) as c:
        yield c


AUTH = {"Authorization": "Bearer test-key-0123456789"}


def _png(img: Image.Image) -> bytes:
    import io

    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


def test_every_dialect_serves_flux3(client: Any) -> None:
    import base64

    gen = client.post(
        "/v1/images/generations",
        headers=AUTH,
        json={
            "model": "flux-3-image-klein",
            "prompt": "p",
            "size": "256x256",
            "response_format": "b64_json",
            "steps": 2,
        },
    )
    assert gen.status_code == 200, gen.text
    assert Image.open(__import__("io").BytesIO(base64.b64decode(gen.json()["data"][0]["b64_json"]))).size == (256, 256)
    files = [("image[]", (f"{i}.png", _png(_ref(i)), "image/png")) for i in range(3)]
    edit = client.post(
        "/v1/images/edits",
        headers=AUTH,
        files=files,
        data={"model": "flux-3-image-klein", "prompt": "p", "size": "256x256"},
    )
    assert edit.status_code == 200, edit.text
    data_url = "data:image/png;base64," + base64.b64encode(_png(_ref(5))).decode()
    refs = {f"input_image_{i}" if i > 1 else "input_image": data_url for i in range(1, 11)}
    bfl = client.post(
        "/v1/flux-3-image-klein",
        headers={"x-key": "test-key-0123456789"},
        json={"prompt": "p", "width": 256, "height": 256, "steps": 2, **refs},
    )
    assert bfl.status_code == 200, bfl.text
    rep = client.post(
        "/v1/models/black-forest-labs/flux-3-image-klein-base/predictions",
        headers=AUTH | {"Prefer": "wait=60"},
        json={
            "input": {
                "prompt": "p",
                "images": [data_url],
                "num_inference_steps": 2,
                "guidance": 3.0,
                "output_megapixels": "0.25",
            }
        },
    )
    assert rep.status_code == 201 and rep.json()["status"] == "succeeded", rep.text
    task = client.post("/vmodel/generate", headers=AUTH, json={"model": "flux-3-image-klein", "input": {"prompt": "p"}})
    assert task.status_code == 200, task.text
    listed = {m["id"]: m for m in client.get("/v1/models", headers=AUTH).json()["data"]}
    assert listed["flux-3-image-klein"]["max_images"] == 10 and listed["flux-3-image-klein"]["kind"] == "flux3"


def test_prompt_upsampling_is_honoured_with_the_upsampler(client: Any) -> None:
    """The demo configures FLUX 3's names with its prompt upsampler: asked for, it rewrites the prompt first,
    so the same seed gives another image; not asked for, the prompt is encoded as written."""

    def image(upsampling: bool) -> bytes:
        bfl = client.post(
            "/v1/flux-3-image-klein",
            headers={"x-key": "test-key-0123456789"},
            json={
                "prompt": "a lighthouse",
                "width": 256,
                "height": 256,
                "steps": 2,
                "seed": 3,
                "prompt_upsampling": upsampling,
                "output_format": "png",
            },
        )
        assert bfl.status_code == 200, bfl.text
        polled = client.get(f"/v1/get_result?id={bfl.json()['id']}", headers={"x-key": "test-key-0123456789"})
        for _ in range(200):
            statuses.add(polled.json()["status"])
            if polled.json()["status"] not in ("Pending", "Reasoning", "Task not found"):
                break
            time.sleep(0.05)
            polled = client.get(f"/v1/get_result?id={bfl.json()['id']}", headers={"x-key": "test-key-0123456789"})
        assert polled.json()["status"] == "Ready", polled.text
        prompts.append(polled.json()["result"]["prompt"])
        return bytes(client.get(polled.json()["result"]["sample"]).content)

    statuses: set[str] = set()
    prompts: list[str] = []
    plain, again, upsampled = image(False), image(False), image(True)
    assert plain == again and plain != upsampled
    # The upsampler's rewrite is the prompt BFL's result shows; the others are the prompt as sent.
    assert prompts[:2] == ["a lighthouse", "a lighthouse"] and prompts[2] and prompts[2] != "a lighthouse"
    rep = client.post(
        "/v1/models/black-forest-labs/flux-3-image-klein/predictions",
        headers=AUTH | {"Prefer": "wait=60"},
        json={
            "input": {"prompt": "p", "prompt_upsampling": True, "num_inference_steps": 2, "output_megapixels": "0.25"}
        },
    )
    assert rep.status_code == 201 and rep.json()["status"] == "succeeded", rep.text


def test_prompt_upsampling_without_an_upsampler_is_a_clear_400(registry: ModelRegistry) -> None:
    from dataclasses import replace

    bare = replace(registry.get("flux-3-image-klein"), upsampler="")
    with pytest.raises(InvalidInput, match="no prompt upsampler") as err:
        bare.make_spec(prompt="p", width=256, height=256, upsample=True, params={"upsample": "input.prompt_upsampling"})
    assert err.value.param == "input.prompt_upsampling"
    assert bare.make_spec(prompt="p", width=256, height=256).upsample is False
    # FLUX.1 and FLUX.2 accept the flag as before: a no-op, not a refusal.
    assert registry.get("flux-2-dev").make_spec(prompt="p", width=256, height=256, upsample=True).upsample is False


@pytest.mark.slow  # compile is proven once in CI (test_speed); this one runs with -m slow
@pytest.mark.timeout(600)
def test_flux3_under_compile_warms_up_and_keeps_pixels_close(registry: ModelRegistry, engine: DiffusersEngine) -> None:
    from fluxserve.engine.speed import SpeedOptions

    only = registry.only(["flux-3-image-klein"])
    fast = DiffusersEngine(
        only, device="cpu", local_files_only=True, speed=SpeedOptions(compile=True, warmup_sizes=((256, 256),))
    )
    fast.load()  # the warm-up compiles text-to-image and one-reference shapes before any request
    req = _req(registry, "flux-3-image-klein", seed=5)
    [[compiled]] = fast.generate([req], lambda *_: None)
    [[eager]] = engine.generate([req], lambda *_: None)
    diff = np.abs(np.asarray(compiled).astype(int) - np.asarray(eager).astype(int))
    assert diff.max() <= 8 and diff.mean() < 0.5


def test_an_upsampling_job_on_a_worker_without_the_upsampler_fails_clearly(
    engine: DiffusersEngine, registry: ModelRegistry
) -> None:
    """The upsampler configured when the job was created, gone from the worker that runs it."""
    from dataclasses import replace

    from fluxserve.errors import GenerationFailed

    req = _req(registry, "flux-3-image-klein", upsample=True)
    pipe = engine.pipeline("flux-3-image-klein")
    kept, pipe.fluxserve_upsampling = pipe.fluxserve_upsampling, None
    try:
        with pytest.raises(GenerationFailed, match="no upsampler"):
            engine.generate([EngineRequest(replace(req.spec))], lambda *_: None)
    finally:
        pipe.fluxserve_upsampling = kept


def test_klein_and_klein_base_share_their_encoder_and_vae_by_content(
    engine: DiffusersEngine, demo_model_dir: Path
) -> None:
    """Two modular pipelines from folders holding the same text encoder and VAE files: loaded once
    (update_components), counted once."""
    from fluxserve.engine.inventory import inventory

    distilled, base = engine.pipeline("flux-3-image-klein"), engine.pipeline("flux-3-image-klein-base")
    for name in ("text_encoder", "vae"):
        assert distilled.components[name] is base.components[name], name
    assert distilled.components["transformer"] is not base.components["transformer"]
    parts = {p.name: p for p in inventory(str(demo_model_dir / "flux3"), 4) or []}
    base_parts = {p.name: p for p in inventory(str(demo_model_dir / "flux3-base"), 4) or []}
    assert parts["text_encoder"].key == base_parts["text_encoder"].key
    # Counted once: both entries list the same key, and the ledger holds each key's bytes once.
    entries = [e for e in engine.pool.all() if e.on_device]
    mine, theirs = (next(e for e in entries if e.pipe is p).parts for p in (distilled, base))
    assert mine["text_encoder"].key == theirs["text_encoder"].key and mine["vae"].key == theirs["vae"].key
    distinct = {p.key: p.nbytes for e in entries for p in e.parts.values()}
    each = sum(p.nbytes for e in entries for p in e.parts.values())
    assert engine.memory()["used_bytes"] == sum(distinct.values()) <= each - mine["text_encoder"].nbytes


def test_bfl_flux3_shape_images_resolution_and_grounding(client: Any) -> None:
    """BFL's FLUX 3 shape on the local klein: ``images`` (data URLs), ``resolution``, ``aspect_ratio``; grounding
    (web search) is refused by name where no upstream serves the name."""
    xkey = {"x-key": "test-key-0123456789"}
    refs = [
        "data:image/png;base64," + base64.b64encode(png_bytes((w, h))).decode() for w, h in ((640, 320), (320, 320))
    ]
    body = {"prompt": "p", "images": refs, "resolution": "768sq", "steps": 2, "output_format": "png"}
    made = client.post("/v1/flux-3-image-klein", headers=xkey, json=body)
    assert made.status_code == 200, made.text
    job = client.app.state.services.store.get_job(made.json()["id"])
    assert (job.spec.width, job.spec.height) == (768, 768) and len(job.spec.images) == 2
    auto = client.post(
        "/v1/flux-3-image-klein", headers=xkey, json={**body, "resolution": "1k", "aspect_ratio": "auto"}
    )
    job = client.app.state.services.store.get_job(auto.json()["id"])
    assert (job.spec.width, job.spec.height) == (1440, 720)  # the first image's 2:1 at about a megapixel
    for bad, param in (({"grounding": True}, "grounding"), ({"resolution": "4k"}, "resolution")):
        refused = client.post("/v1/flux-3-image-klein", headers=xkey, json={**body, **bad})
        assert refused.status_code == 422 and refused.json()["detail"][0]["loc"][-1] == param, refused.text
