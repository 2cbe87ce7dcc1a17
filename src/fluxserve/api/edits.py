"""OpenAI /v1/images/edits and /v1/images/variations (multipart), over the same job core."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from starlette.datastructures import FormData

from ..errors import InvalidInput, UnsupportedMediaType
from ..images import MAX_MASK_BYTES, InputBudget, decode_image_async, mask_from_alpha
from ..loras import LoraRequest
from ..models import ModelSpec
from ..spec import fit_megapixel, parse_size
from .deps import OwnerDep, Services, ServicesDep
from .errors import from_validation_errors
from .inputs import Inputs, LoraItem, lora_items, read_upload, resolve_loras, submit
from .openai_render import run_and_render, stream_response
from .openai_schemas import ImageFields, known_fields, response_format

router = APIRouter(prefix="/v1")
_LORA_LIST = TypeAdapter(list[LoraItem])

MAX_IMAGES = 16
# img2img strength for variations: keeps composition and palette, redraws detail.
VARIATION_STRENGTH = 0.7


class EditForm(ImageFields):
    # Multipart fields arrive as strings: lax parsing turns "2" into 2. Unknown fields are ignored.
    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    model: str | None = None
    n: int = Field(default=1, ge=1, le=10)
    size: str | None = None
    response_format: Literal["url", "b64_json"] | None = None
    strength: float | None = None
    loras: str | None = None  # JSON, as in generations: [{"path": ..., "scale": ...}]
    stream: bool = False  # image_edit.partial_image events (previews), then image_edit.completed
    partial_images: int = Field(default=0, ge=0, le=3)


async def _read_form(request: Request) -> tuple[FormData, EditForm]:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    # A form with no file parts arrives urlencoded; it then fails on the missing image, by name.
    if ctype not in ("multipart/form-data", "application/x-www-form-urlencoded"):
        raise UnsupportedMediaType(
            f"Content-Type must be multipart/form-data; got {ctype or 'none'!r}.", param="Content-Type"
        )
    form = await request.form(max_files=MAX_IMAGES + 8, max_fields=200)
    fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
    try:
        return form, EditForm.model_validate(fields)
    except ValidationError as exc:
        await form.close()
        raise from_validation_errors(list(exc.errors())) from exc


def _size(body: EditForm, first: tuple[int, int]) -> tuple[int, int]:
    return parse_size(body.size) if body.size and body.size != "auto" else fit_megapixel(*first)


def _multipart(*files: str) -> dict[str, Any]:
    """openapi_extra for a form the route parses itself: EditForm's fields plus the file parts."""
    schema = EditForm.model_json_schema()
    schema["properties"] |= {name: {"type": "string", "format": "binary"} for name in files}
    schema["required"] = [files[0]]
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


@router.post("/images/edits", openapi_extra=_multipart("image", "mask"))
async def edit_image(request: Request, services: ServicesDep, owner: OwnerDep) -> Response:
    form, body = await _read_form(request)
    try:  # the uploads' spooled files are closed as soon as their bytes are read
        if form.get("markup") is not None:  # gpt-image-2.5's drawn-on annotations (a file or JSON): not read here
            raise InvalidInput(
                "markup: annotated edits are not supported here; describe the change in the prompt, or send a mask.",
                param="markup",
                code="unsupported_parameter",
            )
        uploads = form.getlist("image") + form.getlist("image[]")
        if not uploads:
            raise InvalidInput(
                "Missing required parameter 'image' (one or more files, as image or image[]).", param="image"
            )
        if len(uploads) > MAX_IMAGES:
            raise InvalidInput(
                f"At most {MAX_IMAGES} images; got {len(uploads)}.", param="image", code="too_many_images"
            )
        has_mask = form.get("mask") is not None
        model = services.registry.get(body.model or ("flux-fill" if has_mask else "flux-kontext-pro"))
        if model.takes_references:
            model.check_image_count(len(uploads), param="image")
        # Each upload judged as it is read (pixels from its header, bytes), with this node's and key's slots.
        budget = InputBudget()
        async with services.intake.hold(owner):
            blobs = [budget.add(await read_upload(u, param="image"), param="image") for u in uploads]
            mask_blob = (
                await read_upload(form.get("mask"), param="mask", max_bytes=MAX_MASK_BYTES) if has_mask else None
            )
            images = [await decode_image_async(blob, param="image", slots=services.decode_slots) for blob in blobs]
    finally:
        await form.close()
    for image in images:
        model.check_reference(image.size, param="image")
    mask = None
    if mask_blob is not None:
        mask_rgba = await decode_image_async(mask_blob, param="mask", max_bytes=MAX_MASK_BYTES, keep_alpha=True)
        mask = mask_from_alpha(mask_rgba, images[0].size)
        del mask_rgba
    width, height = _size(body, images[0].size)
    _check_prompt_given(body)
    inputs = Inputs(images[:1] if mask is not None else images, mask)
    echo = {"images": len(images), "mask": mask is not None}
    # From here the decoded pixels are the Inputs' alone, dropped once stored (a synchronous edit then
    # waits for its job holding none of them: 16 inputs are hundreds of MB decoded).
    del images, image, mask, blobs, mask_blob
    return await _run(request, services, owner, model, body, inputs, (width, height), echo, strength=body.strength)


async def _run(
    request: Request,
    services: Services,
    owner: str,
    model: ModelSpec,
    body: EditForm,
    inputs: Inputs,
    size: tuple[int, int],
    echo: dict[str, Any],
    **overrides: Any,
) -> Response:
    """Validate the form into a spec, store the inputs only then, and run it as a synchronous OpenAI call."""
    loras = await resolve_loras(services, model, _form_loras(body), param="loras")
    spec = body.make_spec(model, *size, loras, images=inputs.keys, mask=inputs.mask_key, **overrides)
    echo = {**known_fields(body), **echo}
    if body.stream:
        spec = replace(spec, partial_images=body.partial_images)
        job = await submit(services, request, owner, "openai", spec, echo, inputs)
        return stream_response(request, services, job, owner, body.quality, "image_edit")
    answer_as = response_format(body.response_format, body.model)
    return await run_and_render(request, services, owner, spec, echo, answer_as, body.quality, inputs)


def _form_loras(body: EditForm) -> list[LoraRequest]:
    if not body.loras:
        return []
    try:
        items = _LORA_LIST.validate_json(body.loras)
    except ValidationError as exc:
        raise InvalidInput(
            'loras must be a JSON list of {"path": NAME, "scale": NUMBER} objects.', param="loras"
        ) from exc
    return lora_items(items)


def _check_prompt_given(body: EditForm) -> None:
    if not body.prompt:
        raise InvalidInput("Missing required parameter 'prompt'.", param="prompt", code="missing_required_parameter")


@router.post("/images/variations", openapi_extra=_multipart("image"))
async def image_variation(request: Request, services: ServicesDep, owner: OwnerDep) -> Response:
    form, body = await _read_form(request)
    try:
        upload = form.get("image") or form.get("image[]")
        if upload is None:
            raise InvalidInput("Missing required parameter 'image' (one file).", param="image")
        upload_bytes = await read_upload(upload, param="image")
    finally:
        await form.close()
    image = await decode_image_async(upload_bytes, param="image", slots=services.decode_slots)
    model = services.registry.get(body.model or "flux-dev")
    if model.traits.image_task != "img2img":  # a variation redraws the one image it is given
        raise InvalidInput(f"Variations need a text-to-image model such as flux-dev; got {model.name}.", param="model")
    width, height = _size(body, image.size)
    strength = VARIATION_STRENGTH if body.strength is None else body.strength
    inputs = Inputs([image])
    del image, upload_bytes
    return await _run(
        request,
        services,
        owner,
        model,
        body,
        inputs,
        (width, height),
        {"images": 1},
        strength=strength,
        allow_empty_prompt=True,
    )
