"""Speed and memory modes on CPU: the default changes no pixel; lossy modes are opt-in and labelled."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

from fluxserve.engine.base import EngineRequest
from fluxserve.engine.flux import DiffusersEngine
from fluxserve.engine.speed import SpeedOptions, resolve_attention
from fluxserve.models import ModelRegistry
from fluxserve.models.demo import demo_weights
from fluxserve.settings import Settings, parse_cache


def _engine(demo: Path, speed: SpeedOptions) -> DiffusersEngine:
    reg = ModelRegistry([m for m in ModelRegistry.demo(demo) if m.name == "flux-dev"])
    engine = DiffusersEngine(reg, device="cpu", local_files_only=True, speed=speed)
    engine.load()
    return engine


def _generate(engine: DiffusersEngine, steps: int = 6) -> np.ndarray:  # type: ignore[type-arg]
    spec = (
        ModelRegistry.default()
        .get("flux-dev")
        .make_spec(prompt="a lighthouse", width=256, height=256, seed=3, steps=steps)
    )
    [[img]] = engine.generate([EngineRequest(spec)], lambda d, t, p: None)
    return np.asarray(img)


def test_default_mode_is_plain_diffusers_pixel_for_pixel(demo_model_dir: Path) -> None:
    ours = _generate(_engine(demo_model_dir, SpeedOptions()))
    pipe = FluxPipeline.from_pretrained(
        demo_weights(demo_model_dir, "text2img"), dtype=torch.float32, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    plain = pipe(
        "a lighthouse",
        height=256,
        width=256,
        num_inference_steps=6,
        guidance_scale=3.5,
        generator=[torch.Generator("cpu").manual_seed(3)],
        max_sequence_length=512,
    ).images[0]
    assert np.array_equal(ours, np.asarray(plain))


def test_first_block_cache_runs_and_is_labelled(demo_model_dir: Path) -> None:
    engine = _engine(demo_model_dir, SpeedOptions(first_block_cache=0.5))
    img = _generate(engine, steps=8)
    assert img.shape == (256, 256, 3)
    assert engine.info()["lossy_modes"] == ["first-block-cache=0.5"]


def test_fp8_refuses_cpu_clearly(demo_model_dir: Path) -> None:
    with pytest.raises(RuntimeError, match=r"compute capability 8\.9"):
        _engine(demo_model_dir, SpeedOptions(quantize="fp8"))


def test_option_parsing() -> None:
    assert parse_cache("first-block") == 0.08 and parse_cache("first-block=0.2") == 0.2 and parse_cache(None) is None
    for bad in ("second-block", "first-block=2", "first-block=x"):
        with pytest.raises(ValueError):
            parse_cache(bad)
    with pytest.raises(ValueError):
        Settings(cache="teacache")
    assert resolve_attention("auto", "cpu") == "native"
    assert resolve_attention("sage", "cuda") == "sage"
    assert SpeedOptions(attention="sage").lossy == ["attention=sage"]
    assert SpeedOptions(attention="_sage_qk_int8_pv_fp8_cuda").lossy == ["attention=_sage_qk_int8_pv_fp8_cuda"]
    with pytest.raises(ValueError, match=r"attention must be one of auto, flash.*got 'flsh'"):
        Settings(attention="flsh")
    assert Settings(attention="_flash_3").attention == "_flash_3"


def test_out_of_memory_fails_that_job_and_the_worker_keeps_serving(
    settings: Settings, demo_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffusers import FluxTransformer2DModel
    from fastapi.testclient import TestClient

    from fluxserve.app import create_app
    from tests.conftest import AUTH

    real_forward = FluxTransformer2DModel.forward
    calls: list[int] = []

    def oom_once(self: FluxTransformer2DModel, *args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(FluxTransformer2DModel, "forward", oom_once)
    engine = DiffusersEngine(ModelRegistry.demo(demo_model_dir), device="cpu", local_files_only=True)
    body = {"model": "flux-schnell", "prompt": "p", "size": "256x256", "response_format": "b64_json"}
    with TestClient(create_app(settings, engine=engine)) as client:
        failed = client.post("/v1/images/generations", json=body, headers=AUTH)
        assert failed.status_code == 500
        error = failed.json()["error"]
        assert error["code"] == "generation_failed" and "Out of device memory at 256x256" in error["message"]
        ok = client.post("/v1/images/generations", json=body, headers=AUTH)
        assert ok.status_code == 200 and ok.json()["data"][0]["b64_json"]
        assert client.get("/health").json()["status"] == "ready"


class _Params:
    def __init__(self, gib: float) -> None:
        self._bytes = int(gib * 2**30)

    def parameters(self) -> list[torch.Tensor]:
        return [torch.empty(self._bytes, dtype=torch.uint8, device="meta")]


class _Pipe:
    """Just the parts of a FLUX pipeline the offload decision reads: real FLUX.1 sizes in bf16."""

    transformer = _Params(23.8)
    text_encoder = _Params(0.25)
    text_encoder_2 = _Params(9.5)
    vae = _Params(0.17)


class _Flux2Dev:
    """FLUX.2 [dev] in bf16: a 32.2 B transformer and Mistral-Small-3.2-24B (with its vision tower)."""

    transformer = _Params(60.0)
    text_encoder = _Params(44.7)
    vae = _Params(0.16)


class _Klein4B:
    """FLUX.2 [klein] 4B in bf16: a 3.88 B transformer and Qwen3-4B."""

    transformer = _Params(7.2)
    text_encoder = _Params(7.5)
    vae = _Params(0.16)


@pytest.mark.parametrize(
    ("pipe", "free_gib", "mode"),
    [
        (_Pipe, 79, "none"),
        (_Pipe, 40, "none"),
        (_Pipe, 36, "model"),
        (_Pipe, 24, "group"),
        (_Pipe, 12, "group"),
        # FLUX.2 [dev] does not fit an 80 GB H100 whole (BFL says the same): the transformer alone does.
        (_Flux2Dev, 79, "model"),
        (_Flux2Dev, 139, "none"),  # H200
        (_Flux2Dev, 47, "group"),
        (_Klein4B, 23, "none"),  # a 24 GB consumer card holds klein 4B whole
        (_Klein4B, 15, "model"),
        (_Klein4B, 8, "group"),
    ],
)
def test_auto_offload_picks_from_free_device_memory(
    pipe: type, free_gib: float, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fluxserve.engine import speed

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(free_gib * 2**30), 80 * 2**30))
    assert speed._auto_offload(pipe(), "cuda:0") == mode
    assert speed._auto_offload(pipe(), "cpu") == "none"


def test_compile_mode_warms_up_fuses_and_keeps_pixels_close(
    demo_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Inductor sets this variable itself after its first compile; the test's setting is restored afterwards.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "unset-by-the-test")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    eager = _engine(demo_model_dir, SpeedOptions())
    params = sum(p.numel() for p in eager.pipeline("flux-dev").transformer.parameters())
    cache = tmp_path / "compile-cache"
    fast = _engine(demo_model_dir, SpeedOptions(compile=True, compile_cache_dir=cache, warmup_sizes=((256, 256),)))
    transformer = fast.pipeline("flux-dev").transformer
    attn = transformer.transformer_blocks[0].attn
    assert attn.fused_projections and not hasattr(attn, "to_q") and hasattr(attn, "to_added_qkv")
    # Fused, without keeping the unfused copies: the same parameter count as before.
    assert sum(p.numel() for p in transformer.parameters()) == params
    # The VAE is left as loaded: channels-last and fused VAE attention made the decode slower on an H100.
    vae = fast.pipeline("flux-dev").vae
    assert not any(getattr(m, "fused_projections", False) for m in vae.modules())
    assert all(p.is_contiguous() for p in vae.parameters())
    # The warm-up at load compiled into the configured cache, before any request.
    assert any(cache.rglob("*")), "no compiled artifacts in the compile cache dir"
    diff = np.abs(_generate(fast).astype(int) - _generate(eager).astype(int))
    assert diff.max() <= 8 and diff.mean() < 0.5
    assert fast.info()["compile"] is True and fast.info()["lossy_modes"] == []


def test_warm_up_covers_the_shapes_requests_use(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = ModelRegistry.default()
    engine = DiffusersEngine(registry, device="cpu", speed=SpeedOptions(compile=True, warmup_sizes=((1024, 1024),)))
    pipes: dict[tuple[str, str, str], object] = {}
    engine._pipes = {m.name: pipes.setdefault((m.weights, m.kind, m.pipeline), object()) for m in registry}
    seen: list[tuple[str, str, int, bool, tuple[int, int]]] = []

    def record(requests: list[EngineRequest], on_step: object) -> list[list[object]]:
        [r] = requests
        seen.append((r.spec.model, r.spec.task, len(r.images), r.mask is not None, (r.spec.width, r.spec.height)))
        return [[]]

    monkeypatch.setattr(engine, "generate", record)
    for model in {id(engine._pipes[m.name]): m for m in reversed(list(registry))}.values():
        engine._warm_up(model)  # once a pipeline, as _ensure does when it loads one
    # Each loaded pipeline once (names sharing weights share it), in the shape its requests have.
    by_task = {task: (n_images, has_mask, size) for _model, task, n_images, has_mask, size in seen}
    assert len(pipes) == 10  # FLUX.1 schnell, dev, Kontext, Fill; FLUX.2 klein 4B, 9B, 9B-KV, dev; FLUX 3 x2
    assert len(seen) == 16  # FLUX.2 and FLUX 3 pipelines warm both text-to-image and one-reference shapes
    assert by_task == {
        "text2img": (0, False, (1024, 1024)),
        "kontext": (1, False, (1024, 1024)),
        "fill": (1, True, (1024, 1024)),
        "references": (1, False, (1024, 1024)),
    }
