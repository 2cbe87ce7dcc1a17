"""The typed registry of public model names: weights, pipeline kind, defaults, limits."""

from __future__ import annotations

import secrets
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from .errors import InvalidInput
from .spec import MAX_SEED, GenerationSpec, OutputFormat, Task, check_prompt, check_size

PipelineKind = Literal["text2img", "kontext", "fill"]
DEFAULT_STRENGTH = 0.8  # Replicate flux-dev's prompt_strength default


@dataclass(frozen=True)
class ModelSpec:
    name: str
    weights: str
    kind: PipelineKind = "text2img"
    default_steps: int = 28
    max_steps: int = 50
    default_guidance: float | None = 3.5
    max_sequence_length: int = 512
    description: str = ""
    demo: bool = False

    @property
    def label(self) -> str:
        return f"{self.name} (demo model: random weights, output is noise)" if self.demo else self.name

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
    ) -> GenerationSpec:
        """Validate a request against this model's limits. ``params`` maps our names to the dialect's."""
        names = {"prompt": "prompt", "size": "size", "steps": "steps", "guidance": "guidance", "seed": "seed",
                 "image": "image", "mask": "mask", "strength": "strength"}  # fmt: skip
        names.update(params or {})
        if not (allow_empty_prompt and prompt == ""):
            check_prompt(prompt, param=names["prompt"])
        task = self._task(images, mask, names)
        if strength is not None and not 0 <= strength <= 1:
            raise InvalidInput(f"{names['strength']} must be between 0 and 1; got {strength}.", param=names["strength"])
        if task == "img2img" and strength is None:
            strength = DEFAULT_STRENGTH
        check_size(width, height, param=names["size"])
        steps = self.default_steps if steps is None else steps
        if not 1 <= steps <= self.max_steps:
            raise InvalidInput(
                f"{names['steps']} must be between 1 and {self.max_steps} for {self.name}; got {steps}.",
                param=names["steps"],
            )
        if guidance is not None and not 0 <= guidance <= 100:
            raise InvalidInput(
                f"{names['guidance']} must be between 0 and 100; got {guidance}.", param=names["guidance"]
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
        )

    def _task(self, images: tuple[str, ...], mask: str | None, names: dict[str, str]) -> Task:
        if self.kind == "fill":
            if len(images) != 1 or mask is None:
                raise InvalidInput(f"{self.name} needs one image and a mask.", param=names["mask"])
            return "fill"
        if mask is not None:
            raise InvalidInput(f"A mask needs the model flux-fill; {self.name} does not take one.", param=names["mask"])
        if self.kind == "kontext":
            return "kontext"
        if len(images) > 1:
            raise InvalidInput(f"{self.name} takes one input image; got {len(images)}.", param=names["image"])
        return "img2img" if images else "text2img"


_SCHNELL = "black-forest-labs/FLUX.1-schnell"
_DEV = "black-forest-labs/FLUX.1-dev"
_KONTEXT = "black-forest-labs/FLUX.1-Kontext-dev"
_FILL = "black-forest-labs/FLUX.1-Fill-dev"

DEFAULT_MODELS: tuple[ModelSpec, ...] = (
    ModelSpec("flux", _SCHNELL, default_steps=4, max_steps=4, default_guidance=None, max_sequence_length=256),
    ModelSpec("flux-schnell", _SCHNELL, default_steps=4, max_steps=4, default_guidance=None, max_sequence_length=256),
    ModelSpec("flux-dev", _DEV, default_steps=28, max_steps=50, default_guidance=3.5),
    # No open pro weights exist: flux-pro is FLUX.1-dev with more steps.
    ModelSpec("flux-pro", _DEV, default_steps=40, max_steps=50, default_guidance=3.5),
    # Kontext max is the same open weights as pro, run for more steps.
    ModelSpec("flux-kontext-pro", _KONTEXT, kind="kontext", default_steps=28, default_guidance=2.5),
    ModelSpec("flux-kontext-max", _KONTEXT, kind="kontext", default_steps=40, default_guidance=2.5),
    ModelSpec("flux-fill", _FILL, kind="fill", default_steps=28, default_guidance=30.0),
)

_OVERRIDABLE = {"weights", "kind", "default_steps", "max_steps", "default_guidance", "max_sequence_length",
                "description", "enabled"}  # fmt: skip


class ModelRegistry:
    def __init__(self, models: list[ModelSpec] | tuple[ModelSpec, ...]) -> None:
        self._models = {m.name: m for m in models}

    def __iter__(self) -> Any:
        return iter(self._models.values())

    def __contains__(self, name: object) -> bool:
        return name in self._models

    @property
    def names(self) -> list[str]:
        return list(self._models)

    def get(self, name: str | None, *, param: str = "model") -> ModelSpec:
        if name is None or name not in self._models:
            allowed = ", ".join(self._models)
            raise InvalidInput(
                f"The model {name!r} does not exist; available models: {allowed}.",
                param=param,
                code="model_not_found",
            )
        return self._models[name]

    def label_demo_weights(self) -> ModelRegistry:
        """A name whose weights are a demo-model folder is labelled demo, however it got there."""
        from .engine.demo import is_demo_model

        return ModelRegistry([replace(m, demo=m.demo or is_demo_model(Path(m.weights))) for m in self])

    @classmethod
    def default(cls) -> ModelRegistry:
        return cls(DEFAULT_MODELS)

    @classmethod
    def demo(cls, demo_path: Path) -> ModelRegistry:
        from .engine.demo import demo_weights

        return cls([replace(m, weights=str(demo_weights(demo_path, m.kind)), demo=True) for m in DEFAULT_MODELS])

    @classmethod
    def from_toml(cls, path: Path) -> ModelRegistry:
        """``[models.NAME]`` tables override a default name's fields or add a new name."""
        with open(path, "rb") as f:
            data = tomllib.load(f)
        models = {m.name: m for m in DEFAULT_MODELS}
        for name, table in data.get("models", {}).items():
            unknown = set(table) - _OVERRIDABLE - {"steps", "guidance"}
            if unknown:
                raise ValueError(
                    f"{path}: [models.{name}] has unknown keys {sorted(unknown)}; allowed: {sorted(_OVERRIDABLE)}"
                )
            fields = dict(table)
            if "steps" in fields:
                fields["default_steps"] = fields.pop("steps")
            if "guidance" in fields:
                fields["default_guidance"] = fields.pop("guidance")
            if not fields.pop("enabled", True):
                models.pop(name, None)
            elif name in models:
                models[name] = replace(models[name], **fields)
            elif "weights" in fields:
                models[name] = ModelSpec(name=name, **fields)
            else:
                raise ValueError(f"{path}: new model [models.{name}] needs 'weights'")
        return cls(list(models.values()))
