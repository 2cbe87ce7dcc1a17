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
        "flux-2-klein-4b",
        "flux-2-klein-9b",
        "flux-2-klein-9b-kv",
        "flux-2-dev",
        "flux-2-pro",
        "flux-2-flex",
        "flux-2-max",
        "flux-3-image-klein",
        "flux-3-image-klein-base",
    ]
    klein3, base3 = reg.get("flux-3-image-klein"), reg.get("flux-3-image-klein-base")
    assert (klein3.kind, klein3.default_steps, klein3.default_guidance, klein3.image_limit) == ("flux3", 16, None, 10)
    assert (base3.default_steps, base3.default_guidance, base3.pipeline) == (50, 4.0, "Flux3ModularPipeline")
    schnell = reg.get("flux-schnell")
    assert (schnell.default_steps, schnell.max_steps, schnell.default_guidance) == (4, 4, None)
    dev, pro = reg.get("flux-dev"), reg.get("flux-pro")
    assert (dev.default_steps, pro.default_steps, dev.default_guidance) == (28, 40, 3.5)
    assert dev.weights == pro.weights  # one loaded copy serves both
    klein, flux2 = reg.get("flux-2-klein-4b"), reg.get("flux-2-dev")
    assert (klein.kind, klein.default_steps, klein.default_guidance, klein.image_limit) == ("flux2", 4, None, 4)
    assert klein.license == "Apache-2.0"
    assert (flux2.default_steps, flux2.default_guidance, flux2.image_limit) == (28, 4.0, 6)
    # The hosted names without open weights share FLUX.2 [dev]'s one loaded copy.
    assert {reg.get(n).weights for n in ("flux-2-pro", "flux-2-flex", "flux-2-max")} == {flux2.weights}
    assert reg.get("flux-2-klein-9b-kv").pipeline == "Flux2KleinKVPipeline"


def test_flux2_references_are_native_and_counted_per_model() -> None:
    reg = ModelRegistry.default()
    klein = reg.get("flux-2-klein-4b")
    spec = klein.make_spec(prompt="p", width=512, height=512, images=("a", "b", "c"))
    assert spec.task == "references" and spec.guidance is None and spec.steps == 4
    with pytest.raises(InvalidInput, match="at most 4 input image") as err:
        klein.make_spec(prompt="p", width=512, height=512, images=tuple("abcde"), params={"image": "input.images"})
    assert (err.value.param, err.value.code) == ("input.images", "too_many_images")
    assert reg.get("flux-2-pro").make_spec(prompt="p", width=512, height=512, images=tuple("abcdefgh")).task
    with pytest.raises(InvalidInput, match="does not take a mask"):
        klein.make_spec(prompt="p", width=512, height=512, images=("a",), mask="m")
    with pytest.raises(InvalidInput, match="at least 64 px"):
        klein.check_reference((48, 512), param="image")
    with pytest.raises(InvalidInput, match="8:1"):
        klein.check_reference((100, 900), param="image")
    klein.check_reference((64, 512), param="image")
    reg.get("flux-dev").check_reference((10, 900), param="image")  # FLUX.1 resizes any shape


def test_guidance_range_is_the_models() -> None:
    reg = ModelRegistry.default()
    with pytest.raises(InvalidInput, match=r"between 1\.5 and 10 for flux-2-flex") as err:
        reg.get("flux-2-flex").make_spec(prompt="p", width=512, height=512, guidance=1.0, params={"guidance": "g"})
    assert err.value.param == "g"
    assert (
        reg.get("flux-fill").make_spec(prompt="p", width=512, height=512, guidance=60, images=("a",), mask="m").guidance
        == 60
    )
    # Models without guidance take none, whatever is sent (clients send it to every model).
    assert reg.get("flux-2-klein-4b").make_spec(prompt="p", width=512, height=512, guidance=50).guidance is None


def test_models_facts_come_from_the_spec(tmp_path: Path) -> None:
    cfg = tmp_path / "models.toml"
    cfg.write_text("[models.flux-dev]\nsteps = 20\nmax_steps = 30\nmax_guidance = 6.0\n")
    facts = ModelRegistry.from_toml(cfg).get("flux-dev").facts()
    assert facts["steps"] == {"default": 20, "min": 1, "max": 30}
    assert facts["guidance"] == {"default": 3.5, "min": 0.0, "max": 6.0}
    assert ModelRegistry.default().get("flux-schnell").facts()["guidance"] is None


def test_only_serves_the_chosen_names() -> None:
    reg = ModelRegistry.default().only(["flux-2-klein-4b", "flux-schnell"])
    assert reg.names == ["flux-2-klein-4b", "flux-schnell"]
    with pytest.raises(ValueError, match="unknown models"):
        ModelRegistry.default().only(["flux-3"])


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
