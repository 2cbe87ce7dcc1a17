"""Any OpenAI Images server as an upstream."""

from __future__ import annotations

import base64
from typing import Any

import httpx

from ..spec import GenerationSpec
from .base import Done, Inputs, Malformed, Provider, Unavailable, call


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
        if not isinstance(answer, dict):
            raise Malformed(f"the answer is a JSON {type(answer).__name__}, not an object")
        data_items = answer.get("data")
        if not data_items:
            raise Unavailable("the upstream's answer had no images")
        blobs = [base64.b64decode(d["b64_json"]) for d in data_items if d.get("b64_json")]
        urls = [str(d["url"]) for d in data_items if d.get("url") and not d.get("b64_json")]
        return Done(urls=urls, blobs=blobs)
