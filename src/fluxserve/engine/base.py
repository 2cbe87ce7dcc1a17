"""The engine boundary: specs in, images out. It knows nothing of HTTP, jobs or storage."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from PIL.Image import Image

from ..spec import GenerationSpec

# on_step(steps_done, steps_total); it may raise Cancelled to stop the call between steps.
OnStep = Callable[[int, int], None]


class Cancelled(Exception):
    """Raised through the pipeline's step callback to stop a generation."""


class Engine(Protocol):
    def load(self) -> None:
        """Load every model's weights; called once by the worker before it takes jobs."""

    def loaded_models(self) -> list[str]: ...

    def generate(self, specs: Sequence[GenerationSpec], on_step: OnStep) -> list[list[Image]]:
        """One pipeline call for specs sharing ``batch_key()``; returns each spec's images in order."""
        ...
