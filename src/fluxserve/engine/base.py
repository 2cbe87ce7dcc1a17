"""The engine boundary: specs (and decoded input images) in, images out. No HTTP, jobs or storage here."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from PIL.Image import Image

from ..spec import GenerationSpec

# on_step(steps_done, steps_total, previews); it may raise Cancelled to stop the call between steps.
# ``previews`` holds decoded in-progress images when the step is one of spec.preview_steps(), else None.
OnStep = Callable[[int, int, "list[Image] | None"], None]


class Cancelled(Exception):
    """Raised through the pipeline's step callback to stop a generation."""


@dataclass
class EngineRequest:
    spec: GenerationSpec
    images: list[Image] = field(default_factory=list)  # decoded spec.images, same order
    mask: Image | None = None  # "L" mode, white = repaint
    # Set by the engine when it rewrote the prompt first (FLUX 3's prompt upsampler): what the images show.
    revised_prompt: str | None = None


class Engine(Protocol):
    device: str  # where it runs once loaded ("cpu", "cuda:0", ...)

    def load(self) -> None:
        """Load every model's weights; called once by the worker before it takes jobs."""

    def loaded_models(self) -> list[str]: ...

    def load_note(self, name: str) -> str | None:
        """What a job for ``name`` waits for before its first step ("loading flux-dev: ..."), or None when
        its pipeline is on the device."""
        ...

    def info(self) -> dict[str, Any]:
        """What /health shows of the engine (device, dtype, speed modes)."""
        ...

    def sleep(self) -> None:
        """Everything off the device; jobs wait until wake_up()."""

    def wake_up(self) -> None: ...

    sleeping: bool
    on_load: Callable[[str, float], None]  # (name, seconds) after a pipeline loads or comes back (metrics)
    on_evict: Callable[[str], None]  # (name) when its pipeline leaves the device
    on_note: Callable[[str], None]  # (text) what the running batch waits for (a download's progress)

    def unload_idle(self, idle_s: float, keep: Collection[str] = ()) -> list[str]:
        """Move pipelines unused for ``idle_s`` seconds off the device, but those ``keep`` names; which went."""
        ...

    def generate(self, requests: Sequence[EngineRequest], on_step: OnStep) -> list[list[Image]]:
        """One pipeline call for requests sharing ``spec.batch_key()``; returns each one's images in order."""
        ...
