"""The typed registry of public model names: weights, pipeline kind, defaults, limits."""

from __future__ import annotations

import secrets
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from .errors import InvalidInput
from .spec import (
    MAX_PIXELS,
    MAX_SEED,
    MAX_SIDE,
    MIN_SIDE,
    SIDE_MULTIPLE,
    Adapter,
    GenerationSpec,
    OutputFormat,
    Task,
    check_prompt,
    check_size,
)
from .upstream.config import UpstreamConfig

# text2img: FLUX.1 (img2img too); kontext: FLUX.1 Kontext; fill: FLUX.1 Fill;
# flux2: any FLUX.2 pipeline (dev, klein, klein KV), references passed natively; flux3: FLUX 3 Image
# Klein (diffusers' modular pipelines, distilled or base), up to 10 references.
PipelineKind = Literal["text2img", "kontext", "fill", "flux2", "flux3"]
DEFAULT_STRENGTH = 0.8  # Replicate flux-dev's prompt_strength default
# FLUX.1 Kontext sees several references as one side-by-side canvas; past this the canvas is mush.
KONTEXT_MAX_IMAGES = 16
# FLUX.2's image processor refuses references smaller than this or longer than 8:1.
FLUX2_MIN_REFERENCE_SIDE = 64
FLUX2_MAX_REFERENCE_ASPECT = 8
FLUX3_MAX_IMAGES = 10  # diffusers' flux3 MAX_REFERENCES


@dataclass(frozen=True)
class ModelSpec:
    name: str
    weights: str
    kind: PipelineKind = "text2img"
    default_steps: int = 28
    max_steps: int = 50
    default_guidance: float | None = 3.5  # None: the model takes no guidance (schnell, distilled klein)
    min_guidance: float = 0.0
    max_guidance: float = 10.0
    max_images: int | None = None  # reference images per request; None: what the kind allows
    max_sequence_length: int = 512
    min_side: int = MIN_SIDE
    max_side: int = MAX_SIDE
    side_multiple: int = SIDE_MULTIPLE
    max_pixels: int = MAX_PIXELS
    license: str = ""
    pipeline: str = ""  # a diffusers class for kind flux2; empty: the one model_index.json names
    # FLUX 3: the prompt upsampler's weights (flux-3-image-klein-pup); empty: none, prompt_upsampling is refused.
    upsampler: str = ""
    description: str = ""
    demo: bool = False
    # Upstream providers ([upstreams.NAME], fluxserve.upstream): served only there, or local first and
    # sent there when no local worker started the job within spill_after_s; fallback: where a failing
    # upstream's jobs go next.
    upstream: str = ""
    upstream_model: str = ""  # the upstream's own name for it; empty: this name
    spill_to: str = ""
    spill_after_s: float = 30.0
    fallback: tuple[str, ...] = ()
    price: float | None = None  # credits per image (or per megapixel with price_per_mp)
    price_per_mp: float | None = None

    @property
    def is_local(self) -> bool:
        """Run by this deployment's devices (possibly spilling upstream), not only by a provider."""
        return not self.upstream

    def served_by(self) -> dict[str, Any]:
        """/v1/models: where jobs of this name run."""
        if self.upstream:
            return {"where": "upstream", "upstream": self.upstream, "fallback": list(self.fallback)}
        if self.spill_to:
            return {"where": "local", "spill_to": self.spill_to, "spill_after_s": self.spill_after_s}
        return {"where": "local"}

    def cost(self, spec: GenerationSpec) -> float | None:
        """The credits a job of this spec costs (None: no price set)."""
        if self.price_per_mp is not None:
            return round(self.price_per_mp * spec.num_images * spec.width * spec.height / 1e6, 6)
        return None if self.price is None else round(self.price * spec.num_images, 6)

    @property
    def label(self) -> str:
        return f"{self.name} (demo model: random weights, output is noise)" if self.demo else self.name

    @property
    def takes_references(self) -> bool:
        """Input images are references to edit from (not an init image to redraw)."""
        return self.kind in ("kontext", "flux2", "flux3")

    @property
    def image_limit(self) -> int:
        if self.max_images is not None:
            return self.max_images
        return {"kontext": KONTEXT_MAX_IMAGES, "flux2": 4, "flux3": FLUX3_MAX_IMAGES}.get(self.kind, 1)

    def facts(self) -> dict[str, Any]:
        """What a client may send this model: /v1/models and the playground show it."""
        guidance = None
        if self.default_guidance is not None:
            guidance = {"default": self.default_guidance, "min": self.min_guidance, "max": self.max_guidance}
        inputs = {
            "text2img": ["prompt", "image"],
            "kontext": ["prompt", "images"],
            "fill": ["prompt", "image", "mask"],
            "flux2": ["prompt", "images"],
            "flux3": ["prompt", "images"],
        }[self.kind]
        return {
            "kind": self.kind,
            "steps": {"default": self.default_steps, "min": 1, "max": self.max_steps},
            "guidance": guidance,
            "max_images": self.image_limit,
            "inputs": inputs,
            "size": {
                "min_side": self.min_side,
                "max_side": self.max_side,
                "multiple": self.side_multiple,
                "max_pixels": self.max_pixels,
            },
            "license": self.license or None,
            "served_by": self.served_by(),
            "price": self.price,
        }

    def check_image_count(self, count: int, *, param: str) -> None:
        if count > self.image_limit:
            raise InvalidInput(
                f"{self.name} takes at most {self.image_limit} input image(s); got {count}.",
                param=param,
                code="too_many_images",
            )

    def check_reference(self, size: tuple[int, int], *, param: str) -> None:
        """FLUX.2's image processor refuses tiny and very long references: say so before anything runs."""
        w, h = size
        if self.kind == "flux2" and (
            min(w, h) < FLUX2_MIN_REFERENCE_SIDE or max(w, h) > FLUX2_MAX_REFERENCE_ASPECT * min(w, h)
        ):
            raise InvalidInput(
                f"{param} is {w}x{h}; {self.name} needs reference images at least {FLUX2_MIN_REFERENCE_SIDE} px "
                f"a side and no longer than {FLUX2_MAX_REFERENCE_ASPECT}:1.",
                param=param,
            )

    def make_spec(
        self,
        *,
        prompt: str,
        width: int,
        height: int,
        num_images: int = 1,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        output_format: OutputFormat = "png",
        quality: int = 100,
        images: tuple[str, ...] = (),
        mask: str | None = None,
        strength: float | None = None,
        params: dict[str, str] | None = None,
        allow_empty_prompt: bool = False,
        loras: tuple[Adapter, ...] = (),
        upsample: bool = False,
    ) -> GenerationSpec:
        """Validate a request against this model's limits. ``params`` maps our names to the dialect's."""
        names = {
            "prompt": "prompt",
            "size": "size",
            "steps": "steps",
            "guidance": "guidance",
            "seed": "seed",
            "image": "image",
            "mask": "mask",
            "strength": "strength",
            "upsample": "prompt_upsampling",
        }
        names.update(params or {})
        names.setdefault("height", names["size"])
        if not (allow_empty_prompt and prompt == ""):
            check_prompt(prompt, param=names["prompt"])
        task = self._task(images, mask, names)
        if strength is not None and not 0 <= strength <= 1:
            raise InvalidInput(f"{names['strength']} must be between 0 and 1; got {strength}.", param=names["strength"])
        if task == "img2img" and strength is None:
            strength = DEFAULT_STRENGTH
        check_size(
            width,
            height,
            param=names["size"],
            height_param=names["height"],
            min_side=self.min_side,
            max_side=self.max_side,
            multiple=self.side_multiple,
            max_pixels=self.max_pixels,
        )
        steps = self.default_steps if steps is None else steps
        if not 1 <= steps <= self.max_steps:
            raise InvalidInput(
                f"{names['steps']} must be between 1 and {self.max_steps} for {self.name}; got {steps}.",
                param=names["steps"],
            )
        # A model without guidance ignores it (clients send it to every model); one with it checks it.
        in_range = guidance is None or self.min_guidance <= guidance <= self.max_guidance
        if self.default_guidance is not None and not in_range:
            raise InvalidInput(
                f"{names['guidance']} must be between {self.min_guidance:g} and {self.max_guidance:g} "
                f"for {self.name}; got {guidance:g}.",
                param=names["guidance"],
            )
        # FLUX.1 and FLUX.2 accept the flag as before (a no-op); FLUX 3 honours it, or says it can't.
        upsample = upsample and self.kind == "flux3"
        if upsample and not self.upsampler:
            raise InvalidInput(
                f'{self.name}: no prompt upsampler is configured here (upsampler = "..." in its [models] table); '
                f"send {names['upsample']}: false, or a prompt written out in full.",
                param=names["upsample"],
            )
        if loras and self.kind == "flux3":
            raise InvalidInput(
                f"{self.name} takes no LoRA adapters here (diffusers has no LoRA loader for FLUX 3).", param="loras"
            )
        if seed is not None and not 0 <= seed <= MAX_SEED:
            raise InvalidInput(f"{names['seed']} must be between 0 and {MAX_SEED}; got {seed}.", param=names["seed"])
        return GenerationSpec(
            model=self.name,
            prompt=prompt,
            width=width,
            height=height,
            num_images=num_images,
            steps=steps,
            guidance=(guidance if guidance is not None else self.default_guidance)
            if self.default_guidance is not None
            else None,
            seed=secrets.randbelow(MAX_SEED + 1) if seed is None else seed,
            output_format=output_format,
            quality=quality,
            task=task,
            images=images,
            mask=mask,
            strength=strength if task == "img2img" else None,
            loras=loras,
            upsample=upsample,
        )

    def _task(self, images: tuple[str, ...], mask: str | None, names: dict[str, str]) -> Task:
        if self.kind in ("flux2", "flux3"):
            if mask is not None:
                raise InvalidInput(f"{self.name} does not take a mask; use flux-fill.", param=names["mask"])
            self.check_image_count(len(images), param=names["image"])
            return "references" if images else "text2img"
        if self.kind == "fill":
            if len(images) != 1 or mask is None:
                raise InvalidInput(f"{self.name} needs one image and a mask.", param=names["mask"])
            return "fill"
        if mask is not None:
            raise InvalidInput(f"A mask needs the model flux-fill; {self.name} does not take one.", param=names["mask"])
        if self.kind == "kontext":
            self.check_image_count(len(images), param=names["image"])
            return "kontext"
        if len(images) > 1:
            raise InvalidInput(f"{self.name} takes one input image; got {len(images)}.", param=names["image"])
        return "img2img" if images else "text2img"


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

# The fields a model table may set even with --demo: where its jobs run and what they cost.
_ROUTING = ("upstream", "upstream_model", "spill_to", "spill_after_s", "fallback", "price", "price_per_mp")
_OVERRIDABLE = {
    "weights",
    "kind",
    "default_steps",
    "max_steps",
    "default_guidance",
    "min_guidance",
    "max_guidance",
    "max_images",
    "max_sequence_length",
    "min_side",
    "max_side",
    "side_multiple",
    "max_pixels",
    "license",
    "pipeline",
    "upsampler",
    "description",
    "enabled",
    *_ROUTING,
}
_KINDS = ("text2img", "kontext", "fill", "flux2", "flux3")


class ModelRegistry:
    def __init__(
        self,
        models: list[ModelSpec] | tuple[ModelSpec, ...],
        aliases: dict[str, str] | None = None,
        upstreams: dict[str, UpstreamConfig] | None = None,
    ) -> None:
        self._models = {m.name: m for m in models}
        # Names clients hard-code (dall-e-3, gpt-image-1) answered by a registry name: [aliases] in the TOML.
        self.aliases = {a: t for a, t in (aliases or {}).items() if t in self._models}
        self.upstreams: dict[str, UpstreamConfig] = dict(upstreams or {})

    def __iter__(self) -> Any:
        return iter(self._models.values())

    def __contains__(self, name: object) -> bool:
        return name in self._models or name in self.aliases

    @property
    def names(self) -> list[str]:
        return list(self._models)

    def get(self, name: str | None, *, param: str = "model") -> ModelSpec:
        name = self.aliases.get(name or "", name)
        if name is None or name not in self._models:
            allowed = ", ".join(self._models)
            raise InvalidInput(
                f"The model {name!r} does not exist; available models: {allowed}.",
                param=param,
                code="model_not_found",
            )
        return self._models[name]

    def _with(self, models: list[ModelSpec], aliases: dict[str, str] | None = None) -> ModelRegistry:
        return ModelRegistry(models, self.aliases if aliases is None else aliases, self.upstreams)

    def only(self, names: list[str]) -> ModelRegistry:
        """The names an operator chose to serve (``--models``); an unknown name is a start-up error."""
        unknown = [n for n in names if n not in self._models]
        if unknown:
            raise ValueError(f"--models names unknown models {unknown}; configured: {', '.join(self._models)}")
        return self._with([self._models[n] for n in dict.fromkeys(names)])

    def local(self) -> ModelRegistry:
        """The names this deployment's devices run (a device never loads an upstream-only name)."""
        return self._with([m for m in self if m.is_local])

    def routed_to(self, upstream: str) -> list[str]:
        """The names whose jobs may run on this upstream: served there, spilled there, or failed over to it."""
        return [m.name for m in self if upstream in (m.upstream, m.spill_to, *m.fallback)]

    def upstream_model(self, name: str, upstream: str) -> str:
        """This name as ``upstream`` knows it (a fallback provider may call it otherwise: its own table's name)."""
        model = self.get(name)
        return model.upstream_model if model.upstream_model and upstream == model.upstream else name

    def cost(self, spec: GenerationSpec) -> float | None:
        model = self.get(spec.model)
        price = model.cost(spec)
        if price is None and model.upstream and self.upstreams[model.upstream].price is not None:
            price = replace(model, price=self.upstreams[model.upstream].price).cost(spec)
        return price

    def label_demo_weights(self) -> ModelRegistry:
        """A name whose weights are a demo-model folder is labelled demo, however it got there."""
        from .engine.demo import is_demo_model

        return self._with([replace(m, demo=m.demo or (m.is_local and is_demo_model(Path(m.weights)))) for m in self])

    def with_aliases(self, aliases: dict[str, str]) -> ModelRegistry:
        return self._with(list(self), {**self.aliases, **aliases})

    @staticmethod
    def aliases_from_toml(path: Path) -> dict[str, str]:
        """``[aliases]``: "dall-e-3" = "flux-dev", one line a name (none by default)."""
        with open(path, "rb") as f:
            table = tomllib.load(f).get("aliases", {})
        bad = {k: v for k, v in table.items() if not isinstance(v, str)}
        if bad:
            raise ValueError(f"{path}: [aliases] values must be model names (strings); got {bad}")
        return dict(table)

    @classmethod
    def default(cls) -> ModelRegistry:
        return cls(DEFAULT_MODELS)

    @classmethod
    def demo(cls, demo_path: Path) -> ModelRegistry:
        from .engine.demo import demo_kinds, demo_upsampler, demo_weights

        kinds = demo_kinds()  # FLUX 3 only where torchvision is installed (its processor needs it)
        return cls(
            [
                replace(
                    m,
                    weights=str(demo_weights(demo_path, m.kind, m.weights)),
                    upsampler=demo_upsampler(demo_path, m.kind),
                    demo=True,
                )
                for m in DEFAULT_MODELS
                if m.kind in kinds
            ]
        )

    @classmethod
    def from_toml(cls, path: Path) -> ModelRegistry:
        """``[models.NAME]`` tables override a default name's fields or add a new name."""
        return cls.default().layered(path)

    def layered(self, path: Path, *, routing_only: bool = False) -> ModelRegistry:
        """This registry with a TOML file's ``[models.*]``, ``[upstreams.*]`` and ``[aliases]`` on top.

        ``routing_only`` (--demo): a model table sets only where its jobs run and what they cost; the
        demo model keeps answering the local names."""
        from .upstream.config import parse_upstreams

        with open(path, "rb") as f:
            data = tomllib.load(f)
        upstreams = {**self.upstreams, **parse_upstreams(data.get("upstreams", {}), str(path))}
        models = dict(self._models)
        for name, table in data.get("models", {}).items():
            unknown = set(table) - _OVERRIDABLE - {"steps", "guidance"}
            if unknown:
                raise ValueError(
                    f"{path}: [models.{name}] has unknown keys {sorted(unknown)}; allowed: {sorted(_OVERRIDABLE)}"
                )
            fields = dict(table)
            if fields.get("kind", "text2img") not in _KINDS:
                raise ValueError(f"{path}: [models.{name}] kind must be one of {', '.join(_KINDS)}")
            if "steps" in fields:
                fields["default_steps"] = fields.pop("steps")
            if "guidance" in fields:
                fields["default_guidance"] = fields.pop("guidance")
            if "fallback" in fields:
                fields["fallback"] = tuple(fields["fallback"])
            if routing_only and name in models:
                fields = {k: v for k, v in fields.items() if k in _ROUTING or k == "enabled"}
            if not fields.pop("enabled", True):
                models.pop(name, None)
            elif name in models:
                models[name] = replace(models[name], **fields)
            elif "weights" in fields or "upstream" in fields:
                models[name] = ModelSpec(name=name, **{"weights": "", **fields})
            else:
                raise ValueError(f"{path}: new model [models.{name}] needs 'weights' (or an 'upstream')")
        for model in models.values():
            _check_routes(model, upstreams, path)
        aliases = {**self.aliases, **self.aliases_from_toml(path)}
        dangling = {a: t for a, t in aliases.items() if t not in models}
        if dangling and not routing_only:
            raise ValueError(f"{path}: [aliases] name models that are not configured: {dangling}")
        return ModelRegistry(list(models.values()), aliases, upstreams)


def _check_routes(model: ModelSpec, upstreams: dict[str, UpstreamConfig], path: Path) -> None:
    named = [n for n in (model.upstream, model.spill_to, *model.fallback) if n]
    missing = [n for n in named if n not in upstreams]
    if missing:
        raise ValueError(
            f"{path}: [models.{model.name}] names upstreams that are not configured: {missing}; "
            f"configured: {', '.join(upstreams) or 'none'} ([upstreams.NAME] tables)"
        )
    if model.upstream and model.spill_to:
        raise ValueError(f"{path}: [models.{model.name}] is served upstream; spill_to is for local models")
    if model.spill_after_s < 0:
        raise ValueError(f"{path}: [models.{model.name}] spill_after_s must be >= 0")
