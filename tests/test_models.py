from pathlib import Path

import pytest

from fluxserve.errors import InvalidInput
from fluxserve.models import ModelRegistry


def test_default_names_and_limits() -> None:
    reg = ModelRegistry.default()
    assert reg.names == [
        "flux",
        "flux-schnell",
        "flux-dev",
        "flux-pro",
        "flux-kontext-pro",
        "flux-kontext-max",
        "flux-fill",
    ]
    schnell = reg.get("flux-schnell")
    assert (schnell.default_steps, schnell.max_steps, schnell.default_guidance) == (4, 4, None)
    dev, pro = reg.get("flux-dev"), reg.get("flux-pro")
    assert (dev.default_steps, pro.default_steps, dev.default_guidance) == (28, 40, 3.5)
    assert dev.weights == pro.weights  # one loaded copy serves both


def test_unknown_model_lists_names() -> None:
    with pytest.raises(InvalidInput) as err:
        ModelRegistry.default().get("dall-e-3")
    assert err.value.code == "model_not_found"
    assert "flux-schnell" in err.value.message


def test_make_spec_validates_steps_per_model() -> None:
    schnell = ModelRegistry.default().get("flux-schnell")
    with pytest.raises(InvalidInput, match="between 1 and 4") as err:
        schnell.make_spec(prompt="p", width=512, height=512, steps=8, params={"steps": "input.num_inference_steps"})
    assert err.value.param == "input.num_inference_steps"
    spec = schnell.make_spec(prompt="p", width=512, height=512, guidance=7.0)
    assert spec.steps == 4 and spec.guidance is None  # schnell has no guidance input
    dev = ModelRegistry.default().get("flux-dev").make_spec(prompt="p", width=512, height=512)
    assert dev.steps == 28 and dev.guidance == 3.5
    with pytest.raises(InvalidInput, match="seed"):
        schnell.make_spec(prompt="p", width=512, height=512, seed=-1)


def test_demo_registry_labels_every_name(tmp_path: Path) -> None:
    reg = ModelRegistry.demo(tmp_path)
    assert all(m.demo and m.weights.startswith(str(tmp_path)) and "demo" in m.label for m in reg)
    assert reg.get("flux-fill").weights == str(tmp_path / "fill")


def test_toml_remaps_and_adds(tmp_path: Path) -> None:
    cfg = tmp_path / "models.toml"
    cfg.write_text(
        '[models.flux-dev]\nweights = "/models/FLUX.1-dev"\nsteps = 20\n\n'
        '[models.my-flux]\nweights = "/models/mine"\nmax_steps = 8\nsteps = 8\nguidance = 2.0\n'
    )
    reg = ModelRegistry.from_toml(cfg)
    assert reg.get("flux-dev").weights == "/models/FLUX.1-dev"
    assert reg.get("flux-dev").default_steps == 20
    assert reg.get("flux-pro").weights == "black-forest-labs/FLUX.1-dev"
    mine = reg.get("my-flux")
    assert (mine.default_steps, mine.max_steps, mine.default_guidance) == (8, 8, 2.0)


def test_toml_rejects_unknown_keys(tmp_path: Path) -> None:
    cfg = tmp_path / "models.toml"
    cfg.write_text('[models.flux]\nwieghts = "typo"\n')
    with pytest.raises(ValueError, match="wieghts"):
        ModelRegistry.from_toml(cfg)
