"""Black Forest Labs' API (api.bfl.ai) as an upstream."""

from __future__ import annotations

import base64
from typing import Any
from urllib.parse import quote

import httpx

from ..spec import FLUX3_RESOLUTIONS as RESOLUTIONS
from ..spec import GenerationSpec
from .base import Done, Inputs, Malformed, Provider, Rejected, Task, Unavailable, call, ratio


class BFL(Provider):
    """api.bfl.ai: POST /v1/{endpoint} -> {id, polling_url}; GET polling_url -> {status, result.sample}."""

    takes_webhooks = True

    def images_per_task(self, spec: GenerationSpec, model: str) -> int:
        return 1

    def headers(self, key: str | None) -> dict[str, str]:
        return {"x-key": key} if key else {}

    def submit(
        self, client: httpx.Client, spec: GenerationSpec, model: str, inputs: Inputs, key: str | None, **kw: Any
    ) -> Task:
        body = flux3_body(spec, model, inputs) if model.startswith("flux-3") else self._classic_body(spec, inputs)
        if kw.get("webhook"):  # BFL posts it when the task ends, signed with the secret: the worker polls then
            body["webhook_url"], body["webhook_secret"] = kw["webhook"]
        answer = call(
            client, "POST", f"{self.config.base_url}/v1/{quote(model)}", json=body, headers=self.submit_headers(key, kw)
        )
        if not isinstance(answer, dict) or not answer.get("id"):
            raise Malformed(f"the answer had no task id: {str(answer)[:200]}")
        return Task(str(answer["id"]), {"poll": str(answer.get("polling_url") or "")})

    @staticmethod
    def _classic_body(spec: GenerationSpec, inputs: Inputs) -> dict[str, Any]:
        """FLUX.1's and FLUX.2's endpoints: input_image, input_image_2..., width/height and aspect_ratio."""
        body: dict[str, Any] = {
            "prompt": spec.prompt,
            "width": spec.width,
            "height": spec.height,
            "aspect_ratio": ratio(spec.width, spec.height),  # kontext and flux-2 read this one
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
        return body

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


def flux3_body(spec: GenerationSpec, model: str, inputs: Inputs) -> dict[str, Any]:
    """BFL's FLUX 3 shape, whichever name the job was asked under (a retired name pointed at a FLUX 3 one takes
    its shape): references as ``images``; FLUX 3 sizes by ``resolution`` and ``aspect_ratio``; FLUX 3.1 by
    the exact width and height, without seed and steps (BFL refuses them there)."""
    body: dict[str, Any] = {"prompt": spec.prompt, "output_format": "jpeg" if spec.output_format == "jpeg" else "png"}
    if inputs.images:
        body["images"] = inputs.data_urls()
    if model.startswith("flux-3.1"):
        body |= {"width": spec.width, "height": spec.height}
    else:
        pixels = spec.width * spec.height
        nearest = min(RESOLUTIONS, key=lambda r: abs(RESOLUTIONS[r] - pixels) if r != "768sq" else 1e18)
        exact = spec.width == spec.height == 768
        body |= {
            "aspect_ratio": ratio(spec.width, spec.height),
            "resolution": "768sq" if exact else nearest,
            "seed": spec.seed,
            "steps": spec.steps,
        }
        if spec.upsample:
            body["prompt_upsampling"] = True
    return body | spec.hosted
