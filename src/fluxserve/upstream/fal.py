"""fal's queue API (queue.fal.run) as an upstream."""

from __future__ import annotations

from typing import Any

import httpx

from ..spec import GenerationSpec
from .base import MAX_MESSAGE, Done, Inputs, Malformed, Provider, Rejected, Task, call


class Fal(Provider):
    """fal's queue API: POST {base}/{model} -> {request_id, status_url, response_url, cancel_url}."""

    def headers(self, key: str | None) -> dict[str, str]:
        return {"Authorization": f"Key {key}"} if key else {}

    def submit(
        self, client: httpx.Client, spec: GenerationSpec, model: str, inputs: Inputs, key: str | None, **kw: Any
    ) -> Task:
        # fal's own apps are under fal-ai/; BFL's FLUX 3 ids are under their publisher (blackforestlabs/flux-3/...).
        path = model if model.startswith(("fal-ai/", "blackforestlabs/")) else f"fal-ai/{model}"
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
            raise Malformed(f"the answer had no request_id: {str(answer)[:200]}")
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
