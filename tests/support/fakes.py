"""FakeEngine: a scripted engine for tests of the HTTP and job layers (never what users run)."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from PIL import Image

from fluxserve.engine.base import EngineRequest, OnStep


class FakeEngine:
    device = "fake"  # not "cpu": the dispatcher overlaps output encoding as it does on a GPU

    sleeping = False

    def __init__(self, step_s: float = 0.0, fail_with: Exception | None = None) -> None:
        self.step_s = step_s
        self.fail_with = fail_with
        self.calls: list[list[EngineRequest]] = []
        self.started = threading.Event()

    def load(self) -> None:
        pass

    def info(self) -> dict[str, str]:
        return {"device": self.device}

    def loaded_models(self) -> list[str]:
        return ["fake"]

    def load_note(self, name: str) -> str | None:
        return None  # always loaded

    def on_load(self, name: str, seconds: float) -> None: ...

    def on_evict(self, name: str) -> None: ...

    def on_note(self, text: str) -> None: ...

    def sleep(self) -> None:
        self.sleeping = True

    def wake_up(self) -> None:
        self.sleeping = False

    def unload_idle(self, idle_s: float, keep: object = ()) -> list[str]:
        return []

    def generate(self, requests: Sequence[EngineRequest], on_step: OnStep) -> list[list[Image.Image]]:
        self.calls.append(list(requests))
        self.started.set()
        first = requests[0].spec
        preview_steps = first.preview_steps()
        for step in range(1, first.steps + 1):
            time.sleep(self.step_s)
            previews = (
                [Image.new("RGB", (first.width, first.height), (step, step, step))] if step in preview_steps else None
            )
            on_step(step, first.steps, previews)
        if self.fail_with is not None:
            raise self.fail_with
        return [
            [Image.new("RGB", (r.spec.width, r.spec.height), (seed % 256, 0, 0)) for seed in r.spec.image_seeds()]
            for r in requests
        ]

    @property
    def last_spec(self):  # type: ignore[no-untyped-def]
        return self.calls[-1][0].spec
