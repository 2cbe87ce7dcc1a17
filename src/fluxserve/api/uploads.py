"""Image inputs named by value in JSON requests: an http(s) URL, a data: URL, bare base64, or the URL of a
file the caller uploaded (Replicate's files API), which is read from our storage, never fetched over HTTP."""

from __future__ import annotations

from PIL import Image

from ..errors import InvalidInput
from ..images import InputBudget, decode_base64, decode_image_async, fetch_image_bytes
from .deps import Services


async def read_own_file(services: Services, owner: str, url: str, *, param: str) -> bytes | None:
    """The bytes of a file URL of ours the caller owns; None when ``url`` is not one of our file URLs."""
    prefix = f"{services.settings.base_url}/v1/files/"
    if not url.startswith(prefix):
        return None
    file_id = url.removeprefix(prefix).split("/", 1)[0].split("?", 1)[0]
    found = await services.files.find(owner, file_id)
    if found is None:
        raise InvalidInput(f"{param}: no file {file_id!r} was uploaded with this API key.", param=param)
    return await services.files.read(found)


async def _value_bytes(value: str, services: Services, owner: str, *, param: str) -> bytes:
    """An http(s) URL, a data: URL, or bare base64 (as BFL clients send); a file the caller uploaded
    (Replicate's files API) by its URL is read from our storage."""
    own = await read_own_file(services, owner, value, param=param)
    if own is not None:
        return own
    if value.startswith(("http://", "https://", "data:")) or "://" in value[:16]:
        return await fetch_image_bytes(value, param=param, allow_private=services.settings.allow_private_urls)
    return decode_base64(value, param=param)


async def image_from_value(
    value: str, services: Services, owner: str, *, param: str, keep_alpha: bool = False
) -> Image.Image:
    async with services.intake.hold(owner):
        data = await _value_bytes(value, services, owner, param=param)
        return await decode_image_async(data, param=param, slots=services.decode_slots, keep_alpha=keep_alpha)


async def images_from_values(values: list[tuple[str, str]], services: Services, owner: str) -> list[Image.Image]:
    """Every (param, value) image of a JSON request, within the per-request pixel and byte budget: each judged
    from its header as it arrives, before the next is fetched and before anything is decoded, with this
    node's and this key's intake slots held meanwhile."""
    budget = InputBudget()
    async with services.intake.hold(owner):
        blobs = [
            budget.add(await _value_bytes(value, services, owner, param=param), param=param) for param, value in values
        ]
        return [
            await decode_image_async(b, param=p, slots=services.decode_slots)
            for (p, _), b in zip(values, blobs, strict=True)
        ]
