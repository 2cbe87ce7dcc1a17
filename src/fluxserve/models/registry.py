"""ModelRegistry: the names this deployment serves, their aliases and the upstreams they route to."""

from __future__ import annotations

import logging
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import InvalidInput
from ..spec import GenerationSpec
from .catalog import DEFAULT_MODELS, HOSTED_ONLY
from .demo import demo_kinds, demo_upsampler, demo_weights, is_demo_model
from .families import KINDS
from .spec import ModelSpec
from .upstreams import UpstreamConfig, parse_upstreams, reference_limit

log = logging.getLogger(__name__)

# What names a model's weights: with --demo, the demo model's folders stand in for them.
_WEIGHTS = ("weights", "kind", "pipeline", "upsampler")
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

    def cost(self, spec: GenerationSpec, *, route: str | object | None = ...) -> float | None:
        """A job's price: the model's own, else that of the upstream it runs on (``route``; by default the
        model's own upstream; None: this server's devices)."""
        model = self.get(spec.model)
        price = model.cost(spec)
        upstream = model.upstream if route is ... else route
        fallback = self.upstreams[upstream].price if isinstance(upstream, str) and upstream in self.upstreams else None
        if price is None and fallback is not None:
            price = replace(model, price=fallback).cost(spec)
        return price

    def label_demo_weights(self) -> ModelRegistry:
        """A name whose weights are a demo-model folder is labelled demo, however it got there."""
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

    def layered(self, path: Path, *, demo_weights: bool = False) -> ModelRegistry:
        """This registry with a TOML file's ``[models.*]``, ``[upstreams.*]`` and ``[aliases]`` on top.

        ``demo_weights`` (--demo): the demo model keeps answering the local names, so what names their weights
        (weights, kind, pipeline, upsampler) is not applied, and a warning says so; defaults, limits, routes
        and prices are."""
        with open(path, "rb") as f:
            data = tomllib.load(f)
        upstreams = {**self.upstreams, **parse_upstreams(data.get("upstreams", {}), str(path))}
        models = dict(self._models)
        for name, table in data.get("models", {}).items():
            nested = [k for k, v in table.items() if isinstance(v, dict)]
            if nested:  # [models.flux-3.1-image] is TOML for models."flux-3"."1-image"
                dotted = f"{name}.{nested[0]}"
                raise ValueError(f'{path}: [models.{dotted}]: a name with a dot must be quoted: [models."{dotted}"]')
            unknown = set(table) - _OVERRIDABLE - {"steps", "guidance"}
            if unknown:
                raise ValueError(
                    f"{path}: [models.{name}] has unknown keys {sorted(unknown)}; allowed: {sorted(_OVERRIDABLE)}"
                )
            fields = dict(table)
            if fields.get("kind", "text2img") not in KINDS:
                raise ValueError(f"{path}: [models.{name}] kind must be one of {', '.join(KINDS)}")
            if "steps" in fields:
                fields["default_steps"] = fields.pop("steps")
            if "guidance" in fields:
                fields["default_guidance"] = fields.pop("guidance")
            if "fallback" in fields:
                fields["fallback"] = tuple(fields["fallback"])
            if demo_weights and name in models:
                kept = {k: v for k, v in fields.items() if k not in _WEIGHTS}
                if len(kept) < len(fields):
                    log.warning(
                        "%s: [models.%s] %s not applied: with --demo the demo model serves it",
                        path,
                        name,
                        ", ".join(sorted(set(fields) - set(kept))),
                    )
                fields = kept
            if not fields.pop("enabled", True):
                models.pop(name, None)
            elif name in models:
                models[name] = replace(models[name], **fields)
            elif name in HOSTED_ONLY and "upstream" in fields:
                models[name] = replace(HOSTED_ONLY[name], **fields)
            elif "weights" in fields or "upstream" in fields:
                models[name] = ModelSpec(name=name, **{"weights": "", **fields})
            else:
                raise ValueError(f"{path}: new model [models.{name}] needs 'weights' (or an 'upstream')")
        for name, model in list(models.items()):
            _check_routes(model, upstreams, path)
            models[name] = _capped(model, upstreams)
        aliases = {**self.aliases, **self.aliases_from_toml(path)}
        dangling = {a: t for a, t in aliases.items() if t not in models}
        if dangling and not demo_weights:
            raise ValueError(f"{path}: [aliases] name models that are not configured: {dangling}")
        return ModelRegistry(list(models.values()), aliases, upstreams)


def _capped(model: ModelSpec, upstreams: dict[str, UpstreamConfig]) -> ModelSpec:
    """A name served upstream takes no more references than every route it may run on carries."""
    limits = [
        reference_limit(upstreams[route].kind, (model.upstream_model if route == model.upstream else "") or model.name)
        for route in (model.upstream, *model.fallback)
        if route
    ]
    known = [n for n in limits if n is not None]
    return replace(model, max_images=min([model.image_limit, *known])) if known else model


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
