"""The MCP tools' arguments: their JSON schemas (bounds and model names from the registry) and the specs
they make. api/mcp.py serves them; every check here raises InvalidInput naming the argument, which the
server answers as a tool error (the model reads it and can fix the call)."""

from __future__ import annotations

from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import InvalidInput
from ..images import mask_from_alpha
from ..models import ModelRegistry, ModelSpec
from ..spec import ASPECT_RATIOS, MAX_SEED, GenerationSpec, aspect_ratio_size, fit_megapixel, parse_size
from .deps import Services
from .errors import from_validation_errors
from .inputs import Inputs, LoraItem, lora_items, resolve_loras
from .uploads import image_from_value, images_from_values

# Hosts typically give a tool call 60 s; a job not done by then is answered with its task id instead.
DEFAULT_WAIT_S = 50.0
MAX_WAIT_S = 300.0
MAX_IMAGES_PER_CALL = 10


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _ImageArgs(_Args):
    """What generate_image and edit_image share."""

    prompt: str = Field(description="What to draw (or, for an edit, what to change).")
    model: str | None = Field(default=None, description="A model of list_models; the default suits the task.")
    size: str | None = Field(default=None, description="'WxH' (e.g. 1024x1024, 1344x768); or give aspect_ratio.")
    aspect_ratio: str | None = Field(default=None, description="Instead of size: about 1 megapixel at this ratio.")
    n: int = Field(default=1, ge=1, le=MAX_IMAGES_PER_CALL, description="How many images.")
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, description="The same seed repeats an image.")
    steps: int | None = Field(default=None, ge=1, description="Denoising steps; the model's default when unset.")
    guidance: float | None = Field(default=None, description="Guidance scale, for models that take one.")
    output_format: Literal["png", "jpeg", "webp"] = "png"
    wait_s: float = Field(
        default=DEFAULT_WAIT_S,
        ge=0,
        le=MAX_WAIT_S,
        description="Seconds to wait for the images; a job still running then is answered with its task id "
        "(poll get_task).",
    )

    def size_for(self, first_input: tuple[int, int] | None) -> tuple[int, int]:
        if self.size is not None and self.aspect_ratio is not None:
            raise InvalidInput("Give size or aspect_ratio, not both.", param="aspect_ratio")
        if self.aspect_ratio is not None:
            return aspect_ratio_size(self.aspect_ratio)
        if self.size is None and first_input is not None:
            return fit_megapixel(*first_input)
        return parse_size(self.size)

    def spec(self, model: ModelSpec, size: tuple[int, int], **extra: Any) -> GenerationSpec:
        param = "aspect_ratio" if self.aspect_ratio is not None else "size"
        return model.make_spec(
            prompt=self.prompt,
            width=size[0],
            height=size[1],
            num_images=self.n,
            steps=self.steps,
            guidance=self.guidance,
            seed=self.seed,
            output_format=self.output_format,
            params={"size": param, "image": "images"},
            **extra,
        )


class GenerateArgs(_ImageArgs):
    loras: list[LoraItem] | None = Field(default=None, description="LoRA adapters: [{path, scale}].")


class EditArgs(_ImageArgs):
    images: list[str] = Field(
        min_length=1,
        description="Input images: http(s) URLs, data: URLs, or files uploaded here (their id or URL).",
    )
    mask: str | None = Field(
        default=None,
        description="Area to repaint, for inpainting models: white (or transparent, as OpenAI's) is repainted.",
    )


class TaskArgs(_Args):
    id: str = Field(min_length=1, max_length=64, description="The task id a generate or edit call answered.")


class GetTaskArgs(TaskArgs):
    wait_s: float = Field(default=0, ge=0, le=MAX_WAIT_S, description="Seconds to wait for it to finish.")


class NoArgs(_Args):
    pass


def parse(model: type[_Args], arguments: dict[str, Any] | None) -> Any:
    try:
        return model.model_validate(arguments or {})
    except ValidationError as exc:
        raise from_validation_errors(list(exc.errors())) from exc


def input_schema(model: type[_Args], registry: ModelRegistry) -> dict[str, Any]:
    """The tool's JSON schema, bounded by what this server serves: its model names as an enum, the
    largest step count and input-image count any of them takes, the aspect ratios it knows."""
    schema = model.model_json_schema()
    props: dict[str, Any] = schema.get("properties", {})
    if "model" in props:
        props["model"] = {
            "type": "string",
            "enum": registry.names,
            "description": props["model"].get("description", ""),
        }
    if "steps" in props:
        props["steps"] = {"type": "integer", "minimum": 1, "maximum": max(m.max_steps for m in registry)}
    if "aspect_ratio" in props:
        props["aspect_ratio"] = {"type": "string", "enum": list(ASPECT_RATIOS)}
    if "images" in props:
        props["images"]["maxItems"] = max(m.image_limit for m in registry)
    schema.pop("title", None)
    return schema


def default_model(registry: ModelRegistry, *, edit: bool, mask: bool) -> str:
    """Text to image: 'flux' where served, else the first name; an edit: the first model that takes a mask
    (with one), else the first that takes reference images, else the first that takes any image."""
    models = list(registry)
    if not edit:
        return "flux" if "flux" in registry else models[0].name
    if mask:
        wanted = [m for m in models if m.traits.takes_mask]
    else:
        wanted = [m for m in models if m.takes_references] or [m for m in models if m.traits.image_task != "text2img"]
    if not wanted:
        raise InvalidInput("No model served here edits images.", param="model")
    return str(wanted[0].name)


async def generate_spec(services: Services, owner: str, args: GenerateArgs) -> GenerationSpec:
    registry = services.registry
    model = registry.get(args.model or default_model(registry, edit=False, mask=False))
    loras = await resolve_loras(services, model, lora_items(args.loras), param="loras")
    return args.spec(model, args.size_for(None), loras=loras)


def _file_url(services: Services, value: str) -> str:
    """A bare id of a file uploaded here (files API) becomes its URL, which uploads.py reads from storage."""
    if value.isalnum() and len(value) == 24:
        return f"{services.settings.base_url}/v1/files/{value}"
    return value


async def edit_spec(services: Services, owner: str, args: EditArgs) -> tuple[GenerationSpec, Inputs]:
    registry = services.registry
    model = registry.get(args.model or default_model(registry, edit=True, mask=args.mask is not None))
    values = [(f"images[{i}]", _file_url(services, v)) for i, v in enumerate(args.images)]
    if len(values) > model.image_limit:  # before fetching anything
        model.check_image_count(len(values), param=values[model.image_limit][0])
    images = await images_from_values(values, services, owner)
    for (param, _), image in zip(values, images, strict=True):
        model.check_reference(image.size, param=param)
    mask = None
    if args.mask is not None:
        raw = await image_from_value(_file_url(services, args.mask), services, owner, param="mask", keep_alpha=True)
        mask = _white_is_repaint(raw, images[0].size)
    inputs = Inputs(images, mask)
    return args.spec(model, args.size_for(images[0].size), images=inputs.keys, mask=inputs.mask_key), inputs


def _white_is_repaint(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    """A mask with transparency is OpenAI's (transparent is repainted); an opaque one is read as BFL's and
    diffusers' (white is repainted)."""
    lowest_alpha: Any = mask.getchannel("A").getextrema()[0]
    if mask.size == size and lowest_alpha < 255:
        return mask_from_alpha(mask, size)
    if mask.size != size:
        raise InvalidInput(
            f"mask is {mask.size[0]}x{mask.size[1]} but the image is {size[0]}x{size[1]}; they must match.",
            param="mask",
            code="invalid_mask_size",
        )
    return mask.convert("L")
