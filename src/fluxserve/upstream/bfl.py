"""Black Forest Labs' API (api.bfl.ai) as an upstream."""

from __future__ import annotations

import base64
from typing import Any
from urllib.parse import quote

import httpx

from ..spec import GenerationSpec
from .base import Done, Inputs, Malformed, Provider, Rejected, Task, Unavailable, call, ratio


class BFL(Provider):
    """api.bfl.ai: POST /v1/{endpoint} -> {id, polling_url}; GET polling_url -> {status, result.sample}."""

    def images_per_task(self, spec: GenerationSpec, model: str) -> int:
        return 1

    def headers(self, key: str | None) -> dict[str, str]:
        return {"x-key": key} if key else {}

    def submit(
        self, client: httpx.Client, spec: GenerationSpec, model: str, inputs: Inputs, key: str | None, **kw: Any
    ) -> Task:
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
        answer = call(
            client, "POST", f"{self.config.base_url}/v1/{quote(model)}", json=body, headers=self.submit_headers(key, kw)
        )
        if not isinstance(answer, dict) or not answer.get("id"):
            raise Malformed(f"the answer had no task id: {str(answer)[:200]}")
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
