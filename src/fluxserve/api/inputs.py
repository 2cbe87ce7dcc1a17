"""Turning image inputs (uploads, URLs, data: URLs, bare base64) into stored, validated images."""

from __future__ import annotations

import hashlib
import io
import secrets
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from PIL import Image
from pydantic import BaseModel, ConfigDict
from starlette.datastructures import UploadFile
from starlette.requests import Request

from ..errors import InvalidInput, PayloadTooLarge
from ..images import C2PA_SOURCE, MAX_IMAGE_BYTES
from ..job import Job
from ..loras import LoraRequest, check_requests
from ..models import ModelSpec
from ..provenance import SOURCE_MARK, source_key
from ..spec import MEGAPIXELS, Adapter, GenerationSpec, aspect_ratio_size, fit_megapixel
from ..storage import Storage
from .deps import Services, idempotency_key
from .uploads import images_from_values


def known_fields(body: BaseModel, *, exclude: Collection[str] = (), exclude_unset: bool = False) -> dict[str, Any]:
    """What a job row keeps of a request: the fields this server reads, and only the names of the
    unknown ones it ignored (their values could be megabytes)."""
    extra = body.model_extra or {}
    dropped = set(extra) | set(exclude)
    echo = body.model_dump(exclude_none=not exclude_unset, exclude_unset=exclude_unset, exclude=dropped)
    if extra:
        echo["ignored_fields"] = sorted(name[:64] for name in extra)[:20]
    return echo


MAX_IDEMPOTENCY_KEY = 255


async def read_upload(value: object, *, param: str, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    if not isinstance(value, UploadFile):
        raise InvalidInput(f"{param} must be a file upload.", param=param, code="invalid_image_file")
    if value.size is not None and value.size > max_bytes:
        raise PayloadTooLarge(
            f"{param} is {value.size} bytes; the maximum is {max_bytes} bytes.", param=param, code="image_too_large"
        )
    data = await value.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"{param} is larger than {max_bytes} bytes.", param=param, code="image_too_large")
    return data


@dataclass
class Inputs:
    """Decoded input images and the storage keys they will have; saved only once the spec validated."""

    images: list[Image.Image]
    mask: Image.Image | None = None
    prefix: str = field(default_factory=lambda: f"inputs/{secrets.token_hex(12)}")
    count: int = field(init=False)
    has_mask: bool = field(init=False)

    def __post_init__(self) -> None:
        self.count = len(self.images)
        self.has_mask = self.mask is not None
        # Inputs that came with a C2PA manifest: their file as sent is kept beside the pixels (the key says so),
        # for the edit's manifest to name as an ingredient with its own manifest (provenance, workers/device.py).
        self._sources = tuple(img.info.get(C2PA_SOURCE) for img in self.images)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(f"{self.prefix}/{i}{SOURCE_MARK if s else ''}.png" for i, s in enumerate(self._sources))

    @property
    def mask_key(self) -> str | None:
        return f"{self.prefix}/mask.png" if self.has_mask else None

    async def store(self, services: Services) -> str | None:
        """save() off the event loop (PNG encoding and file writes), then the decoded pixels are let go:
        the worker reads the stored copies. None without images."""
        if self.count or self.has_mask:
            digest = await services.jobs.run_slow(self.save, services.storage)
            self.images, self.mask = [], None
            return digest
        return None

    def save(self, storage: Storage) -> str:
        """Inputs live in storage, not the job row, so a re-queued job still has them after a restart.

        Returns a digest of every stored byte: an Idempotency-Key replay with other images is a 409,
        not the first job's result (the job row holds URLs and elided data: URLs, not pixels)."""
        digest = hashlib.sha256()
        stored = list(zip(self.keys, self.images, strict=True))
        if self.mask is not None and self.mask_key is not None:
            stored.append((self.mask_key, self.mask))
        for key, img in stored:
            data = _png(img)
            storage.put(key, data)
            digest.update(key.rsplit("/", 1)[-1].encode() + hashlib.sha256(data).digest())
        for key, source in zip(self.keys, self._sources, strict=True):
            if source:
                storage.put(source_key(key), source)
        return digest.hexdigest()

    async def discard(self, services: Services) -> None:
        """Stored inputs no job uses (the create was refused, or replayed an earlier job) go at once."""
        if self.count or self.has_mask:
            await services.jobs.run_slow(services.storage.delete_folder, self.prefix)


class LoraItem(BaseModel):
    """One adapter in the OpenAI extension field ``loras`` (fal's shape): a name, hub id or URL, and a scale."""

    model_config = ConfigDict(extra="forbid", strict=True)

    path: str
    scale: float = 1.0


def lora_items(items: list[LoraItem] | None, *, param: str = "loras") -> list[LoraRequest]:
    return [
        LoraRequest(i.path, i.scale, f"{param}[{n}].path", f"{param}[{n}].scale") for n, i in enumerate(items or [])
    ]


async def resolve_loras(
    services: Services, model: ModelSpec, requests: list[LoraRequest], *, param: str
) -> tuple[Adapter, ...]:
    """The request's adapters as local safetensors files that fit the model, or a 4xx naming the field."""
    check_requests(requests, param=param)
    return await services.loras.resolve(requests, model) if requests else ()


async def submit(
    services: Services,
    request: Request,
    owner: str,
    dialect: str,
    spec: GenerationSpec,
    echo: dict[str, Any],
    inputs: Inputs | None = None,
    **job: Any,
) -> Job:
    """The one submit path of every dialect: the validated request's inputs stored, then the job
    queued under the request's Idempotency-Key. Inputs are stored first so no worker can claim a job
    whose images aren't there yet; if no job ends up using them, they are deleted before answering."""
    key = idempotency_key(request)
    if key is not None and len(key) > MAX_IDEMPOTENCY_KEY:  # the column's size: PostgreSQL refuses longer
        raise InvalidInput(
            f"Idempotency-Key is {len(key)} characters; at most {MAX_IDEMPOTENCY_KEY} are allowed.",
            param="Idempotency-Key",
        )
    digest = await inputs.store(services) if inputs is not None else None
    try:
        queued = await services.jobs.submit(
            owner, dialect, spec, echo, idempotency_key=idempotency_key(request), input_digest=digest, **job
        )
    except Exception:
        if inputs is not None:
            await inputs.discard(services)
        raise
    if inputs is not None and queued.spec.images != inputs.keys:  # a replay: the first job has its own copies
        await inputs.discard(services)
    return queued


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


INLINE_ECHO_LIMIT = 256 * 1024


def elide_inline_images(fields: dict[str, object]) -> dict[str, object]:
    """Echoed inputs keep URLs and small data: URLs as sent; big inline images, single or in lists
    (``input_images``, ``images``), are not copied into every job row, GET, list page and webhook."""
    return {name: _elided(value) for name, value in fields.items()}


def _elided(value: object) -> object:
    if isinstance(value, list):
        return [_elided(item) for item in value]
    if isinstance(value, str) and len(value) > INLINE_ECHO_LIMIT and not value.startswith(("http://", "https://")):
        return f"{value[:32]}...(elided, {len(value)} characters)"
    return value


async def image_and_size(
    services: Services,
    owner: str,
    model: ModelSpec,
    values: list[tuple[str, str]],
    *,
    aspect_ratio: str,
    aspect_explicit: bool,
    megapixels: str = "1",
    aspect_param: str = "aspect_ratio",
) -> tuple[Inputs, int, int]:
    """Task-API image inputs ([(param, value)]) and the output size they imply.

    An image-to-image model keeps the input's aspect ratio; a reference model (Kontext, FLUX.2)
    keeps the first reference's unless an aspect ratio is asked for; 'match_input_image' asks
    for it explicitly.
    """
    if len(values) > model.image_limit:  # before fetching anything; names the first field past the limit
        model.check_image_count(len(values), param=values[model.image_limit][0])
    inputs = Inputs(await images_from_values(values, services, owner))
    for (param, _), image in zip(values, inputs.images, strict=True):
        model.check_reference(image.size, param=param)
    match_input = aspect_ratio == "match_input_image" or (
        bool(inputs.images) and (not model.takes_references or not aspect_explicit)
    )
    if not match_input:
        width, height = aspect_ratio_size(aspect_ratio, megapixels, param=aspect_param)
    elif not inputs.images:
        raise InvalidInput(f"{aspect_param} 'match_input_image' needs an input image.", param=aspect_param)
    else:
        width, height = fit_megapixel(*inputs.images[0].size, target=round(MEGAPIXELS[megapixels] * 1024 * 1024))
    return inputs, width, height
