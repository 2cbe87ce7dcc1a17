"""The default public names: FLUX.1, FLUX.2 and FLUX 3 weights on the hub, as BFL and the hosts name them."""

from __future__ import annotations

from .spec import ModelSpec

_SCHNELL = "black-forest-labs/FLUX.1-schnell"
_DEV = "black-forest-labs/FLUX.1-dev"
_KONTEXT = "black-forest-labs/FLUX.1-Kontext-dev"
_FILL = "black-forest-labs/FLUX.1-Fill-dev"
_FLUX2_DEV = "black-forest-labs/FLUX.2-dev"
_NC = "FLUX [dev] Non-Commercial"
_KOMMUNITY = "FLUX Kommunity License"


def _klein(name: str, weights: str, license: str, pipeline: str = "") -> ModelSpec:
    """Step-distilled klein: 4 steps, and diffusers ignores guidance for it (its signature defaults,
    50 steps / guidance 4, are the Base model's), so none is offered."""
    return ModelSpec(
        name,
        weights,
        kind="flux2",
        default_steps=4,
        max_steps=8,
        default_guidance=None,
        max_images=4,
        license=license,
        pipeline=pipeline,
    )


def _flux2_dev(name: str, steps: int, max_images: int, guidance: float = 4.0, min_guidance: float = 1.0) -> ModelSpec:
    """FLUX.2 [dev] also serves the hosted names that have no open weights, as FLUX.1-dev serves flux-pro."""
    return ModelSpec(
        name,
        _FLUX2_DEV,
        kind="flux2",
        default_steps=steps,
        default_guidance=guidance,
        min_guidance=min_guidance,
        max_images=max_images,
        license=_NC,
    )


DEFAULT_MODELS: tuple[ModelSpec, ...] = (
    ModelSpec(
        "flux",
        _SCHNELL,
        default_steps=4,
        max_steps=4,
        default_guidance=None,
        max_sequence_length=256,
        license="Apache-2.0",
    ),
    ModelSpec(
        "flux-schnell",
        _SCHNELL,
        default_steps=4,
        max_steps=4,
        default_guidance=None,
        max_sequence_length=256,
        license="Apache-2.0",
    ),
    ModelSpec("flux-dev", _DEV, default_steps=28, max_steps=50, default_guidance=3.5, license=_NC),
    # No open pro weights exist: flux-pro is FLUX.1-dev with more steps.
    ModelSpec("flux-pro", _DEV, default_steps=40, max_steps=50, default_guidance=3.5, license=_NC),
    # Kontext max is the same open weights as pro, run for more steps.
    ModelSpec("flux-kontext-pro", _KONTEXT, kind="kontext", default_steps=28, default_guidance=2.5, license=_NC),
    ModelSpec("flux-kontext-max", _KONTEXT, kind="kontext", default_steps=40, default_guidance=2.5, license=_NC),
    ModelSpec(
        "flux-fill", _FILL, kind="fill", default_steps=28, default_guidance=30.0, max_guidance=100.0, license=_NC
    ),
    _klein("flux-2-klein-4b", "black-forest-labs/FLUX.2-klein-4B", "Apache-2.0"),
    _klein("flux-2-klein-9b", "black-forest-labs/FLUX.2-klein-9B", _NC),
    # The KV-cache variant (Flux2KleinKVPipeline): reference tokens' keys and values computed once.
    _klein("flux-2-klein-9b-kv", "black-forest-labs/FLUX.2-klein-9b-kv", _NC, pipeline="Flux2KleinKVPipeline"),
    # BFL's API takes 8 references for pro/flex/max and recommends at most 6 for [dev].
    _flux2_dev("flux-2-dev", steps=28, max_images=6),
    _flux2_dev("flux-2-pro", steps=28, max_images=8),
    # flex is the hosted FLUX.2 whose steps and guidance clients set (Replicate: 30 / 4.5, 1.5-10).
    _flux2_dev("flux-2-flex", steps=30, max_images=8, guidance=4.5, min_guidance=1.5),
    _flux2_dev("flux-2-max", steps=40, max_images=8),
    # FLUX 3 Image Klein: step-distilled (flow map), 16 steps, no guidance; and its base, 50 steps with CFG.
    ModelSpec(
        "flux-3-image-klein",
        "black-forest-labs/flux-3-image-klein",
        kind="flux3",
        default_steps=16,
        max_steps=32,
        default_guidance=None,
        license=_KOMMUNITY,
        pipeline="Flux3DistilledModularPipeline",
    ),
    ModelSpec(
        "flux-3-image-klein-base",
        "black-forest-labs/flux-3-image-klein-base",
        kind="flux3",
        default_steps=50,
        max_steps=100,
        default_guidance=4.0,
        min_guidance=1.0,
        license=_KOMMUNITY,
        pipeline="Flux3ModularPipeline",
    ),
)

# Hosted-only names (BFL's FLUX 3 API; no open weights): served only where an upstream is configured for them
# (``[models.flux-3-image] upstream = "bfl"``), with these facts; absent otherwise, /v1/models included.
HOSTED_ONLY: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        ModelSpec("flux-3-image", "", kind="flux3", default_steps=28, max_steps=50, default_guidance=None),
        # FLUX 3.1: up to 16 MP or an exact size; BFL refuses seed and steps for it, so none are sent.
        ModelSpec(
            "flux-3.1-image",
            "",
            kind="flux3",
            default_steps=28,
            max_steps=50,
            default_guidance=None,
            max_side=4096,
            max_pixels=4096 * 4096,
        ),
    )
}
