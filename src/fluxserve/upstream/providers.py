"""Each provider kind's request and result shapes, from a job's spec (the registry's names), over httpx.

A provider turns one image of a job into one upstream *task* (BFL, Replicate, fal: an id to poll) or,
for a synchronous OpenAI Images server, into the images at once. Errors are two kinds: ``Rejected``
(the provider refused the request: moderation, bad input; not retried) and ``Unavailable`` (429, 5xx,
timeouts, connection errors; retried, then failed over).
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from ..errors import FluxServeError
from ..spec import GenerationSpec
from .config import UpstreamConfig

MAX_MESSAGE = 500  # an upstream's error text is passed on, but not a megabyte of it


class Rejected(FluxServeError):
    """The provider refused the request (4xx other than 429): the job fails with its message, once."""

    code = "upstream_rejected"


class Unavailable(FluxServeError):
    """The provider could not answer now (429, 5xx, timeout, connection): retry, then fail over."""

    code = "upstream_unavailable"

    def __init__(self, message: str, *, maybe_sent: bool = False) -> None:
        super().__init__(message)
        # The request may have reached the provider (a read timeout, a dropped connection): not an
        # unanswered connect, so a second submit could start a second, charged task.
        self.maybe_sent = maybe_sent


@dataclass(frozen=True)
class Task:
    """One upstream task: what the job event records before polling, so a restarted worker resumes it."""

    id: str
    urls: dict[str, str] = field(default_factory=dict)  # the provider's own status/result/cancel URLs

    def to_dict(self) -> dict[str, Any]:
        return {"task_id": self.id, "urls": self.urls}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Task:
        return cls(str(d["task_id"]), dict(d.get("urls") or {}))


@dataclass(frozen=True)
class Done:
    """A finished task's images: URLs to fetch (on the provider's host) or bytes it sent inline."""

    urls: list[str] = field(default_factory=list)
    blobs: list[bytes] = field(default_factory=list)


@dataclass(frozen=True)
class Inputs:
    images: list[bytes]
    mask: bytes | None = None

    def data_urls(self) -> list[str]:
        return [_data_url(b) for b in self.images]


def _data_url(blob: bytes) -> str:
    mime = "image/jpeg" if blob[:3] == b"\xff\xd8\xff" else "image/webp" if blob[8:12] == b"WEBP" else "image/png"
    return f"data:{mime};base64,{base64.b64encode(blob).decode()}"


def _message(resp: httpx.Response) -> str:
    """The provider's own words: OpenAI's error.message, Replicate's/BFL's/fal's detail, or the body."""
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:MAX_MESSAGE] or f"HTTP {resp.status_code}"
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:MAX_MESSAGE]
        for key in ("detail", "error", "message", "title"):
            if body.get(key):
                value = body[key]
                return (value if isinstance(value, str) else json.dumps(value))[:MAX_MESSAGE]
    return json.dumps(body)[:MAX_MESSAGE]


def call(client: httpx.Client, method: str, url: str, **kw: Any) -> Any:
    """One request; its JSON, or the error kind its status says."""
    try:
        resp = client.request(method, url, **kw)
    except httpx.HTTPError as exc:
        unsent = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
        raise Unavailable(f"the upstream did not answer ({type(exc).__name__})", maybe_sent=not unsent) from exc
    if resp.status_code == 429 or resp.status_code >= 500:
        raise Unavailable(f"the upstream answered HTTP {resp.status_code}: {_message(resp)}")
    if resp.status_code >= 400:
        raise Rejected(_message(resp))
    try:
        return resp.json()
    except ValueError as exc:
        raise Unavailable(f"the upstream answered HTTP {resp.status_code} with a body that is not JSON") from exc


def _ratio(width: int, height: int) -> str:
    d = math.gcd(width, height)
    return f"{width // d}:{height // d}"


class Provider:
    """A kind's shapes. ``submit`` returns a Task to poll, or Done when the provider answers at once."""

    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config

    def headers(self, key: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"} if key else {}

    def own_url(self, url: str | None, default: str) -> str:
        """A URL the provider handed back is followed only on its own host (no redirecting our worker)."""
        if url and (urlsplit(url).hostname, urlsplit(url).port) == (
            urlsplit(self.config.base_url).hostname,
            urlsplit(self.config.base_url).port,
        ):
            return url
        return default

    def submit(
        self, client: httpx.Client, spec: GenerationSpec, model: str, inputs: Inputs, key: str | None, **kw: str
    ) -> Any:
        """``idempotency_key``: sent as Idempotency-Key (a fluxserve upstream replays the first answer)."""
        raise NotImplementedError

    def images_per_task(self, spec: GenerationSpec, model: str) -> int:
        """How many of a job's images one task makes (BFL: one; the rest take a count)."""
        return spec.num_images

    def submit_headers(self, key: str | None, kw: dict[str, str]) -> dict[str, str]:
        extra = {"Idempotency-Key": kw["idempotency_key"]} if kw.get("idempotency_key") else {}
        return self.headers(key) | extra

    def poll(self, client: httpx.Client, task: Task, key: str | None) -> Done | None:
        raise NotImplementedError

    def cancel(self, client: httpx.Client, task: Task, key: str | None) -> None:
        """Best effort: the provider stops (and may not charge for) a task nobody wants any more."""


class BFL(Provider):
    """api.bfl.ai: POST /v1/{endpoint} -> {id, polling_url}; GET polling_url -> {status, result.sample}."""

    def images_per_task(self, spec: GenerationSpec, model: str) -> int:
        return 1

    def headers(self, key: str | None) -> dict[str, str]:
        return {"x-key": key} if key else {}

    def submit(
        self, client: httpx.Client, spec: GenerationSpec, model: str, inputs: Inputs, key: str | None, **kw: str
    ) -> Task:
        body: dict[str, Any] = {
            "prompt": spec.prompt,
            "width": spec.width,
            "height": spec.height,
            "aspect_ratio": _ratio(spec.width, spec.height),  # kontext and flux-2 read this one
            "steps": spec.steps,
            "seed": spec.seed,
            "output_format": "jpeg" if spec.output_format == "jpeg" else "png",
        }
        if spec.guidance is not None:
            body["guidance"] = spec.guidance
        for i, image in enumerate(inputs.images):
            body["input_image" if i == 0 else f"input_image_{i + 1}"] = base64.b64encode(image).decode()
        if inputs.mask is not None:
            body["image"], body["mask"] = body.pop("input_image"), base64.b64encode(inputs.mask).decode()
        answer = call(
            client, "POST", f"{self.config.base_url}/v1/{quote(model)}", json=body, headers=self.submit_headers(key, kw)
        )
        if not isinstance(answer, dict) or not answer.get("id"):
            raise Unavailable("the upstream's answer had no task id")
        return Task(str(answer["id"]), {"poll": str(answer.get("polling_url") or "")})

    def poll(self, client: httpx.Client, task: Task, key: str | None) -> Done | None:
        default = f"{self.config.base_url}/v1/get_result?id={quote(task.id)}"
        answer = call(client, "GET", self.own_url(task.urls.get("poll"), default), headers=self.headers(key))
        status = str(answer.get("status", ""))
        if status == "Ready":
            sample = (answer.get("result") or {}).get("sample")
            if not sample:
                raise Unavailable("the upstream's result had no sample URL")
            return Done(urls=[str(sample)])
        if status in ("Pending", "Queued", "Processing", ""):
            return None
        detail = answer.get("details") or answer.get("result") or status
        raise Rejected(f"{status}: {detail}" if detail != status else status)


class Replicate(Provider):
    """api.replicate.com: POST /v1/models/{owner}/{name}/predictions {input} -> a prediction to poll."""

    def images_per_task(self, spec: GenerationSpec, model: str) -> int:
        name = model.rsplit("/", 1)[-1]
        return spec.num_images if name in ("flux-dev", "flux-schnell") else 1

    def model_path(self, model: str) -> str:
        return model if "/" in model else f"black-forest-labs/{model}"

    def build_input(self, spec: GenerationSpec, model: str, inputs: Inputs) -> dict[str, Any]:
        """Replicate's FLUX schemas, by family: pro and FLUX.2 take a custom size and ``steps``, dev and
        schnell an aspect ratio and ``num_inference_steps``; references by the field each one names."""
        name = model.rsplit("/", 1)[-1]
        fmt = "jpg" if spec.output_format == "jpeg" else spec.output_format
        body: dict[str, Any] = {"prompt": spec.prompt, "seed": spec.seed, "output_format": fmt}
        flux2 = name.startswith("flux-2")
        if "kontext" in name:
            body["aspect_ratio"] = _ratio(spec.width, spec.height) if not inputs.images else "match_input_image"
            if inputs.images:
                body["input_image"] = inputs.data_urls()[0]
            return body
        if flux2 and "klein" in name:
            body |= {"aspect_ratio": _ratio(spec.width, spec.height), "images": inputs.data_urls()}
            return body
        if flux2 or "pro" in name:
            body |= {"aspect_ratio": "custom", "width": spec.width, "height": spec.height}
            if flux2:
                body["input_images"] = inputs.data_urls()
            if name in ("flux-pro", "flux-2-flex"):
                body["steps"] = spec.steps
                if spec.guidance is not None:
                    body["guidance"] = spec.guidance
            return body
        body |= {"aspect_ratio": _ratio(spec.width, spec.height), "num_inference_steps": spec.steps}
        if spec.num_images > 1:
            body["num_outputs"] = spec.num_images
        if spec.guidance is not None:
            body["guidance"] = spec.guidance
        if inputs.images:
            body["image"] = inputs.data_urls()[0]
            body["prompt_strength"] = spec.strength
        return body

    def submit(
        self, client: httpx.Client, spec: GenerationSpec, model: str, inputs: Inputs, key: str | None, **kw: str
    ) -> Task:
        url = f"{self.config.base_url}/v1/models/{self.model_path(model)}/predictions"
        answer = call(
            client,
            "POST",
            url,
            json={"input": self.build_input(spec, model, inputs)},
            headers=self.submit_headers(key, kw),
        )
        if not isinstance(answer, dict) or not answer.get("id"):
            raise Unavailable("the upstream's answer had no prediction id")
        return Task(str(answer["id"]))

    def poll(self, client: httpx.Client, task: Task, key: str | None) -> Done | None:
        url = f"{self.config.base_url}/v1/predictions/{quote(task.id)}"
        answer = call(client, "GET", url, headers=self.headers(key))
        status = answer.get("status")
        if status == "succeeded":
            output = answer.get("output")
            urls = output if isinstance(output, list) else [output] if output else []
            if not urls:
                raise Unavailable("the upstream's prediction succeeded with no output")
            return Done(urls=[str(u) for u in urls])
        if status in ("failed", "canceled", "aborted"):
            raise Rejected(str(answer.get("error") or f"the upstream prediction {status}"))
        return None

    def cancel(self, client: httpx.Client, task: Task, key: str | None) -> None:
        call(
            client, "POST", f"{self.config.base_url}/v1/predictions/{quote(task.id)}/cancel", headers=self.headers(key)
        )


class Fal(Provider):
    """fal's queue API: POST {base}/{model} -> {request_id, status_url, response_url, cancel_url}."""

    def headers(self, key: str | None) -> dict[str, str]:
        return {"Authorization": f"Key {key}"} if key else {}

    def submit(
        self, client: httpx.Client, spec: GenerationSpec, model: str, inputs: Inputs, key: str | None, **kw: str
    ) -> Task:
        path = model if model.startswith("fal-ai/") else f"fal-ai/{model}"
        body: dict[str, Any] = {
            "prompt": spec.prompt,
            "image_size": {"width": spec.width, "height": spec.height},
            "num_inference_steps": spec.steps,
            "num_images": spec.num_images,
            "seed": spec.seed,
            "output_format": "jpeg" if spec.output_format == "jpeg" else "png",
        }
        if spec.guidance is not None:
            body["guidance_scale"] = spec.guidance
        if inputs.images:
            body["image_url"] = inputs.data_urls()[0]
            body["image_urls"] = inputs.data_urls()
        if spec.strength is not None:
            body["strength"] = spec.strength
        answer = call(client, "POST", f"{self.config.base_url}/{path}", json=body, headers=self.submit_headers(key, kw))
        if not isinstance(answer, dict) or not answer.get("request_id"):
            raise Unavailable("the upstream's answer had no request_id")
        base = f"{self.config.base_url}/{path}/requests/{answer['request_id']}"
        urls = {
            "status": self.own_url(answer.get("status_url"), f"{base}/status"),
            "response": self.own_url(answer.get("response_url"), base),
            "cancel": self.own_url(answer.get("cancel_url"), f"{base}/cancel"),
        }
        return Task(str(answer["request_id"]), urls)

    def poll(self, client: httpx.Client, task: Task, key: str | None) -> Done | None:
        status = call(client, "GET", self.own_url(task.urls.get("status"), ""), headers=self.headers(key))
        if status.get("status") != "COMPLETED":
            return None
        result = call(client, "GET", self.own_url(task.urls.get("response"), ""), headers=self.headers(key))
        images = result.get("images") if isinstance(result, dict) else None
        if not images:
            raise Rejected(_message_of(result) or "the upstream's result had no images")
        return Done(urls=[str(img["url"]) for img in images if isinstance(img, dict) and img.get("url")])

    def cancel(self, client: httpx.Client, task: Task, key: str | None) -> None:
        call(client, "PUT", self.own_url(task.urls.get("cancel"), ""), headers=self.headers(key))


def _message_of(result: Any) -> str:
    if isinstance(result, dict) and result.get("detail"):
        return str(result["detail"])[:MAX_MESSAGE]
    return ""


class OpenAI(Provider):
    """Any OpenAI Images server: synchronous, so there is no task to poll; an Idempotency-Key (the job's)
    lets a fluxserve upstream answer a repeated request with the first one's images."""

    def submit(
        self, client: httpx.Client, spec: GenerationSpec, model: str, inputs: Inputs, key: str | None, **kw: str
    ) -> Done:
        fields: dict[str, Any] = {
            "model": model,
            "prompt": spec.prompt,
            "n": spec.num_images,
            "size": f"{spec.width}x{spec.height}",
            "response_format": "b64_json",
            "output_format": spec.output_format,
        }
        if inputs.images:
            files: list[tuple[str, tuple[str, bytes, str]]] = [
                ("image[]", (f"image-{i}.png", blob, "application/octet-stream"))
                for i, blob in enumerate(inputs.images)
            ]
            if inputs.mask is not None:
                files.append(("mask", ("mask.png", inputs.mask, "image/png")))
            data = {k: str(v) for k, v in fields.items()}
            url = f"{self.config.base_url}/v1/images/edits"
            answer = call(client, "POST", url, data=data, files=files, headers=self.submit_headers(key, kw))
        else:
            url = f"{self.config.base_url}/v1/images/generations"
            answer = call(client, "POST", url, json=fields, headers=self.submit_headers(key, kw))
        data_items = answer.get("data") if isinstance(answer, dict) else None
        if not data_items:
            raise Unavailable("the upstream's answer had no images")
        blobs = [base64.b64decode(d["b64_json"]) for d in data_items if d.get("b64_json")]
        urls = [str(d["url"]) for d in data_items if d.get("url") and not d.get("b64_json")]
        return Done(urls=urls, blobs=blobs)


PROVIDERS: dict[str, type[Provider]] = {"bfl": BFL, "replicate": Replicate, "fal": Fal, "openai": OpenAI}


def provider_for(config: UpstreamConfig) -> Provider:
    return PROVIDERS[config.kind](config)
