"""Any OpenAI Images server as an upstream."""

from __future__ import annotations

import base64
from typing import Any

import httpx

from ..spec import GenerationSpec
from .base import Done, Inputs, Malformed, Provider, Unavailable, call

# OpenAI's own image models take no seed, steps or guidance (its API refuses unknown parameters).
OPENAI_MODELS = ("gpt-image", "dall-e", "chatgpt-image")


class OpenAI(Provider):
    """Any OpenAI Images server: synchronous, so there is no task to poll; an Idempotency-Key (the job's)
    lets a fluxserve upstream answer a repeated request with the first one's images.

    ``base_url`` may end in ``/v1`` or not (both forms are in every OpenAI client's docs). Other servers' FLUX
    models (a second fluxserve, LocalAI and the like) take ``seed``, ``steps`` and ``guidance`` beside the
    OpenAI fields, so the job's are sent; the seed each image reports is the one its output records."""

    @property
    def api(self) -> str:
        base = self.config.base_url
        return base if base.endswith("/v1") else f"{base}/v1"

    def submit(
        self, client: httpx.Client, spec: GenerationSpec, model: str, inputs: Inputs, key: str | None, **kw: Any
    ) -> Done:
        fields: dict[str, Any] = {
            "model": model,
            "prompt": spec.prompt,
            "n": spec.num_images,
            "size": f"{spec.width}x{spec.height}",
            "response_format": "b64_json",
            "output_format": spec.output_format,
        }
        if spec.output_format != "png":  # the job's quality, so the answer can be stored as it comes (no re-encode)
            fields["output_compression"] = spec.quality
        if not model.startswith(OPENAI_MODELS):
            extra = {"seed": spec.seed, "steps": spec.steps, "guidance": spec.guidance}
            fields |= {k: v for k, v in extra.items() if v is not None}
        # The answer is the images: wait for them as long as the job may still wait, not a fixed minute (a
        # slow generation cut off after the provider billed it would be a lost answer).
        wait = httpx.Timeout(kw["wait_s"], connect=10.0) if kw.get("wait_s") else httpx.USE_CLIENT_DEFAULT
        if inputs.images:
            files: list[tuple[str, tuple[str, bytes, str]]] = [
                ("image[]", (f"image-{i}.png", blob, "application/octet-stream"))
                for i, blob in enumerate(inputs.images)
            ]
            if inputs.mask is not None:
                files.append(("mask", ("mask.png", inputs.mask, "image/png")))
            data = {k: str(v) for k, v in fields.items()}
            url = f"{self.api}/images/edits"
            answer = call(
                client, "POST", url, data=data, files=files, headers=self.submit_headers(key, kw), timeout=wait
            )
        else:
            url = f"{self.api}/images/generations"
            answer = call(client, "POST", url, json=fields, headers=self.submit_headers(key, kw), timeout=wait)
        if not isinstance(answer, dict):
            raise Malformed(f"the answer is a JSON {type(answer).__name__}, not an object")
        data_items = answer.get("data")
        if not data_items:
            raise Unavailable("the upstream's answer had no images")
        inline = [d for d in data_items if d.get("b64_json")]
        linked = [d for d in data_items if d.get("url") and not d.get("b64_json")]
        seeds = [d["seed"] if isinstance(d.get("seed"), int) else None for d in inline + linked]
        return Done(
            urls=[str(d["url"]) for d in linked], blobs=[base64.b64decode(d["b64_json"]) for d in inline], seeds=seeds
        )
