"""The OpenAI Images dialect: /v1/images/generations, /v1/models, and edits (api/edits.py)."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request

from ..models import ModelSpec
from . import batches, edits, provenance
from .bodylimit import JSON_BODY_BYTES, UPLOAD_BODY_BYTES
from .deps import OwnerDep, ServicesDep
from .dialect import Dialect
from .errors import json_body, read_json, render_openai
from .inputs import submit
from .lean import lean
from .openai_render import run_and_render, stream_response, task_body
from .openai_schemas import DEFAULT_MODEL, ImageGenerationRequest, known_fields, response_format

router = APIRouter(prefix="/v1")


@router.post("/images/generations", openapi_extra=json_body(ImageGenerationRequest))
@lean
async def create_image(request: Request, services: ServicesDep, owner: OwnerDep) -> Any:
    body = await read_json(request, ImageGenerationRequest)
    model = services.registry.get(body.model or DEFAULT_MODEL)
    spec = await body.to_spec(services, owner, model)
    echo = known_fields(body)
    if body.stream:
        spec = replace(spec, partial_images=body.partial_images or 0)
        job = await submit(services, request, owner, "openai", spec, echo)
        return stream_response(request, services, job, owner, body.quality, "image_generation")
    answer_as = response_format(body.response_format, body.model)
    return await run_and_render(request, services, owner, spec, echo, answer_as, body.quality)


@router.get("/images/tasks/{task_id}")
@lean
async def get_image_task(task_id: str, services: ServicesDep, owner: OwnerDep) -> dict[str, Any]:
    """An async-mode task (new-api's "async": true, or Prefer: respond-async) as it is now."""
    return task_body(services, await services.jobs.get(task_id, owner, "openai"))


@router.get("/models")
async def list_models(services: ServicesDep, _owner: OwnerDep) -> dict[str, Any]:
    created = int(time.time())
    loaded = set(services.dispatcher.loaded_models())
    states = _model_states(services.dispatcher.engine_info())

    def entry(name: str, m: ModelSpec) -> dict[str, Any]:
        return {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "fluxserve-demo" if m.demo else "fluxserve",
            "description": m.label,
            "demo": m.demo,
            **({"alias_of": m.name} if name != m.name else {}),
            **m.facts(),  # defaults and limits every dialect applies: clients and the playground read them
            # Loaded on a worker, or loaded when its first job runs; a provider's names are always ready.
            "state": "ready" if m.name in loaded or not m.is_local else states.get(m.name, {}).get("state", "unloaded"),
            # What its pipeline takes on the device (what it shares with another name counted in both).
            "memory_bytes": states.get(m.name, {}).get("memory_bytes"),
        }

    aliases = [entry(alias, services.registry.get(target)) for alias, target in services.registry.aliases.items()]
    return {"object": "list", "data": [entry(m.name, m) for m in services.registry] + aliases}


def _model_states(info: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each name's state on this process's engines: ready on one beats loading beats unloaded."""
    rank = {"ready": 2, "loading": 1, "unloaded": 0}
    out: dict[str, dict[str, Any]] = {}
    engines = info["workers"] if isinstance(info.get("workers"), list) else [info]
    for engine in engines:
        models = engine.get("models")
        if not isinstance(models, dict):
            continue  # a cluster row lists names only
        for name, state in models.items():
            if name not in out or rank[state["state"]] > rank[out[name]["state"]]:
                out[name] = state
    return out


def _body_limit(path: str) -> int:
    uploads = ("/v1/images/edits", "/v1/images/variations", "/v1/content_provenance_checks")
    return UPLOAD_BODY_BYTES if path.startswith(uploads) else JSON_BODY_BYTES


# Last in the list: every path no other dialect claims answers in OpenAI's envelope.
DIALECT = Dialect(
    "openai",
    (router, edits.router, batches.router, provenance.router),
    lambda path: True,
    render_openai,
    body_limit=_body_limit,
)
