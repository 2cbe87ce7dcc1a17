"""The AUTOMATIC1111 / Forge API (`/sdapi/v1`), as Open WebUI's "Automatic1111" engine, SillyTavern and
scripts call it: txt2img and img2img answer synchronously with base64 PNGs, ``progress`` and ``interrupt``
act on the caller's latest job, ``sd-models`` lists our names and ``options`` switches the caller's model.

A1111 is a Stable Diffusion UI: ``negative_prompt`` has no FLUX counterpart (ignored, said in ``info``),
``sampler_name``/``scheduler`` are accepted and ignored (FLUX runs its own flow-matching scheduler),
``cfg_scale`` is the model's guidance (ignored by models without one, as in every dialect).
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import Headers

from ..errors import ClientDisconnected, FluxServeError, InvalidInput
from ..job import Job, Status
from ..models import ModelSpec
from .bodylimit import IMAGE_JSON_BODY_BYTES, JSON_BODY_BYTES
from .deps import OwnerFrom, Services, ServicesDep
from .dialect import Dialect
from .errors import field_details, http_status, job_failure, json_body, read_json
from .inputs import Inputs, known_fields, submit
from .lean import lean
from .openai_schemas import DEFAULT_MODEL
from .uploads import image_from_value

router = APIRouter(prefix="/sdapi/v1")
_PARAMS = {
    "prompt": "prompt",
    "size": "width",
    "height": "height",
    "steps": "steps",
    "guidance": "cfg_scale",
    "seed": "seed",
    "image": "init_images",
    "strength": "denoising_strength",
}


def _basic_key(headers: Headers) -> str | None:
    """Bearer, or HTTP basic as A1111's --api-auth user:password (any user name; the password is the key)."""
    header = headers.get("authorization") or ""
    scheme, _, value = header.partition(" ")
    key = value.strip() or None
    if scheme.lower() == "basic" and key:
        try:
            key = base64.b64decode(key, validate=True).decode("utf-8").partition(":")[2] or None
        except (binascii.Error, UnicodeDecodeError):
            key = None
    elif scheme.lower() != "bearer":
        key = None
    return key


Owner = Depends(OwnerFrom(_basic_key))
# The model each key switched to through POST /options (this node's memory; a request's
# override_settings.sd_model_checkpoint always wins).
_CHECKPOINT = "fluxserve_a1111_checkpoints"


class Txt2Img(BaseModel):
    model_config = ConfigDict(extra="allow")  # A1111 has dozens of fields (hr_*, restore_faces...): ignored

    prompt: str = Field(default="", max_length=32_000)
    negative_prompt: str = Field(default="", max_length=32_000)
    width: int = 512
    height: int = 512
    steps: int | None = None
    cfg_scale: float | None = None
    seed: int = -1
    batch_size: int = Field(default=1, ge=1, le=8)
    n_iter: int = Field(default=1, ge=1, le=8)
    sampler_name: str | None = Field(default=None, max_length=100)
    scheduler: str | None = Field(default=None, max_length=100)
    override_settings: dict[str, Any] = Field(default_factory=dict, max_length=64)
    send_images: bool = True


class Img2Img(Txt2Img):
    init_images: list[str] = Field(min_length=1, max_length=1)
    denoising_strength: float = 0.75


def _model(request: Request, services: Services, owner: str, body: Txt2Img) -> ModelSpec:
    chosen = body.override_settings.get("sd_model_checkpoint")
    if chosen is None:
        chosen = getattr(request.app.state, _CHECKPOINT, {}).get(owner, DEFAULT_MODEL)
    if not isinstance(chosen, str):
        raise InvalidInput("override_settings.sd_model_checkpoint must be a model name.", param="sd_model_checkpoint")
    return services.registry.get(chosen.split(" [")[0], param="override_settings.sd_model_checkpoint")


def _used_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """What a job row keeps of override_settings: the one setting read, and the names of the others (their
    values, any size, are not copied into the row and every event and webhook of the job)."""
    kept: dict[str, Any] = {}
    checkpoint = settings.get("sd_model_checkpoint")
    if isinstance(checkpoint, str):
        kept["sd_model_checkpoint"] = checkpoint[:255]
    ignored = sorted(name[:64] for name in settings if name != "sd_model_checkpoint")[:20]
    if ignored:
        kept["ignored"] = ignored
    return kept


async def _generate(request: Request, services: Services, owner: str, body: Txt2Img, images: list[Any]) -> Any:
    model = _model(request, services, owner, body)
    if body.batch_size * body.n_iter > 10:
        raise InvalidInput("batch_size x n_iter may be at most 10 images.", param="n_iter")
    seed = None if body.seed == -1 else body.seed
    inputs = Inputs(images)
    spec = model.make_spec(
        prompt=body.prompt,
        width=body.width,
        height=body.height,
        num_images=body.batch_size * body.n_iter,
        steps=body.steps,
        guidance=body.cfg_scale if model.default_guidance is not None else None,
        seed=seed,
        images=inputs.keys,
        strength=body.denoising_strength if isinstance(body, Img2Img) else None,
        params=_PARAMS,
    )
    echo = known_fields(body, exclude={"init_images", "override_settings"})
    if body.override_settings:
        echo["override_settings"] = _used_settings(body.override_settings)
    job = await submit(services, request, owner, "a1111", spec, echo, inputs)
    while not job.status.is_terminal:
        job = await services.jobs.wait(job.id, owner, timeout=1.0, seen=job)
        if not job.status.is_terminal and await request.is_disconnected():
            await services.jobs.cancel(job.id, owner)
            raise ClientDisconnected("The client closed the connection before the images were ready.")
    if job.status is Status.FAILED:
        raise job_failure(job)  # a provider's refusal is the client's 400, not a 500
    return await services.jobs.run_slow(_response, services, job, body, model)


def _response(services: Services, job: Job, body: Txt2Img, model: ModelSpec) -> dict[str, Any]:
    """A1111's answer: base64 PNGs, the request's parameters, and ``info`` as a JSON string."""
    spec = job.spec
    images = [base64.b64encode(services.storage.read(o.key)).decode() for o in job.outputs] if body.send_images else []
    info = {
        "prompt": spec.prompt,
        "all_prompts": [spec.prompt] * len(job.outputs),
        "negative_prompt": body.negative_prompt,
        "seed": spec.seed,
        "all_seeds": [o.seed for o in job.outputs],
        "width": job.size[0],
        "height": job.size[1],
        "steps": spec.steps,
        "cfg_scale": spec.guidance,
        "sd_model_name": model.name,
        "sampler_name": body.sampler_name or "flow-match Euler",
        "job_id": job.id,
        "interrupted": job.status is Status.CANCELED,
        "comments": "negative_prompt and sampler_name are ignored: FLUX has no negative prompt, its own scheduler.",
    }
    params = body.model_dump(exclude={"init_images"})
    return {"images": images, "parameters": params, "info": json.dumps(info)}


@router.post("/txt2img", openapi_extra=json_body(Txt2Img))
@lean
async def txt2img(request: Request, services: ServicesDep, owner: str = Owner) -> Any:
    body = await read_json(request, Txt2Img)
    return await _generate(request, services, owner, body, [])


@router.post("/img2img", openapi_extra=json_body(Img2Img))
async def img2img(request: Request, services: ServicesDep, owner: str = Owner) -> Any:
    body = await read_json(request, Img2Img)
    image = await image_from_value(body.init_images[0], services, owner, param="init_images[0]")
    return await _generate(request, services, owner, body, [image])


async def _latest(services: Services, owner: str) -> Job | None:
    jobs = await services.jobs.list(owner, "a1111", before=None, limit=1)
    return jobs[0] if jobs else None


@router.get("/progress")
@lean
async def progress(services: ServicesDep, owner: str = Owner, skip_current_image: bool = False) -> dict[str, Any]:
    job = await _latest(services, owner)
    live = job is not None and not job.status.is_terminal
    state = {
        "skipped": False,
        "interrupted": bool(job and job.status is Status.CANCELED),
        "job": job.id if job else "",
        "job_count": 1 if live else 0,
        "job_timestamp": "",
        "job_no": 0,
        "sampling_step": job.progress_done if job else 0,
        "sampling_steps": job.progress_total if job else 0,
    }
    current = None
    if live and job is not None and job.previews and not skip_current_image:
        current = base64.b64encode(await services.jobs.run_slow(services.storage.read, job.previews[-1])).decode()
    fraction = job.progress if live and job is not None else 0.0
    eta = None
    if live and job is not None and job.started_at and fraction > 0:
        eta = (time.time() - job.started_at) * (1 - fraction) / fraction
    return {
        "progress": fraction,
        "eta_relative": eta or 0.0,
        "state": state,
        "current_image": current,
        "textinfo": None,
    }


@router.post("/interrupt")
async def interrupt(services: ServicesDep, owner: str = Owner) -> Response:
    job = await _latest(services, owner)
    if job is not None and not job.status.is_terminal:
        await services.jobs.cancel(job.id, owner)
    return Response(status_code=200, content="{}", media_type="application/json")


@router.post("/skip")
async def skip(services: ServicesDep, owner: str = Owner) -> Response:
    return await interrupt(services, owner)


@router.get("/sd-models")
async def sd_models(services: ServicesDep, _owner: str = Owner) -> list[dict[str, Any]]:
    return [
        {
            "title": m.name,
            "model_name": m.name,
            "hash": None,
            "sha256": None,
            "filename": m.name,  # a name, never a path on this server's disk
            "config": None,
        }
        for m in services.registry
    ]


@router.get("/options")
async def get_options(request: Request, services: ServicesDep, owner: str = Owner) -> dict[str, Any]:
    current = getattr(request.app.state, _CHECKPOINT, {}).get(owner, DEFAULT_MODEL)
    return {"sd_model_checkpoint": current, "samples_format": "png", "CLIP_stop_at_last_layers": 1}


class Options(BaseModel):
    model_config = ConfigDict(extra="allow")

    sd_model_checkpoint: str | None = Field(default=None, max_length=200)


@router.post("/options", openapi_extra=json_body(Options))
async def set_options(request: Request, services: ServicesDep, owner: str = Owner) -> Response:
    body = await read_json(request, Options)
    if body.sd_model_checkpoint is not None:
        name = services.registry.get(body.sd_model_checkpoint.split(" [")[0], param="sd_model_checkpoint").name
        if not hasattr(request.app.state, _CHECKPOINT):
            setattr(request.app.state, _CHECKPOINT, {})
        getattr(request.app.state, _CHECKPOINT)[owner] = name
    return Response(status_code=200, content="null", media_type="application/json")


@router.get("/samplers")
async def samplers(_owner: str = Owner) -> list[dict[str, Any]]:
    return [{"name": "Euler", "aliases": ["flow-match Euler"], "options": {}}]


def render_a1111(exc: FluxServeError) -> JSONResponse:
    """A1111's FastAPI error body: {"error", "detail", "body", "errors"} (422 for bad input, as there)."""
    status, _ = http_status(exc)
    status = 422 if status == 400 else status
    detail: Any = field_details(exc) if status == 422 else exc.message
    return JSONResponse({"error": exc.code, "detail": detail, "body": "", "errors": exc.message}, status_code=status)


def _body_limit(path: str) -> int:
    return IMAGE_JSON_BODY_BYTES if path.startswith("/sdapi/v1/img2img") else JSON_BODY_BYTES


DIALECT = Dialect("a1111", (router,), lambda path: path.startswith("/sdapi/"), render_a1111, body_limit=_body_limit)
