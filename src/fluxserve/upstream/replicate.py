"""Replicate's predictions API as an upstream."""

from __future__ import annotations

import math
from typing import Any
from urllib.parse import quote

import httpx

from ..spec import GenerationSpec
from .base import Done, Inputs, Malformed, Provider, Rejected, Task, Unavailable, call, ratio

# The aspect ratios replicate.com's FLUX Kontext models take.
KONTEXT_RATIOS = ("1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3", "4:5", "5:4", "21:9", "9:21", "2:1", "1:2")


def nearest_ratio(width: int, height: int) -> str:
    def off(r: str) -> float:
        w, h = (int(n) for n in r.split(":"))
        return abs(math.log((width / height) / (w / h)))

    return min(KONTEXT_RATIOS, key=off)


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
            # The size asked for, as the nearest ratio Kontext takes (it makes about 1 MP at that ratio);
            # fluxserve reports the size the image comes back at.
            body["aspect_ratio"] = nearest_ratio(spec.width, spec.height)
            if inputs.images:
                body["input_image"] = inputs.data_urls()[0]
            return body
        if flux2 and "klein" in name:
            body |= {"aspect_ratio": ratio(spec.width, spec.height), "images": inputs.data_urls()}
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
        body |= {"aspect_ratio": ratio(spec.width, spec.height), "num_inference_steps": spec.steps}
        if spec.num_images > 1:
            body["num_outputs"] = spec.num_images
        if spec.guidance is not None:
            body["guidance"] = spec.guidance
        if inputs.images:
            body["image"] = inputs.data_urls()[0]
            body["prompt_strength"] = spec.strength
        return body

    def submit(
        self, client: httpx.Client, spec: GenerationSpec, model: str, inputs: Inputs, key: str | None, **kw: Any
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
            raise Malformed(f"the answer had no prediction id: {str(answer)[:200]}")
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
