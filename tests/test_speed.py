"""Speed and memory modes on CPU: the default changes no pixel; lossy modes are opt-in and labelled."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

from fluxserve.engine.base import EngineRequest
from fluxserve.engine.demo import demo_weights
from fluxserve.engine.flux import DiffusersEngine
from fluxserve.engine.speed import SpeedOptions, parse_cache, resolve_attention
from fluxserve.models import ModelRegistry
from fluxserve.settings import Settings


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
    plain = pipe("a lighthouse", height=256, width=256, num_inference_steps=6, guidance_scale=3.5,
                 generator=[torch.Generator("cpu").manual_seed(3)], max_sequence_length=512).images[0]  # fmt: skip
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
