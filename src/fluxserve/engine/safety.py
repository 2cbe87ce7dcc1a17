"""The optional output safety check: an image classifier (transformers' image classification, from a local
folder such as an NSFW ViT) run on each generated image before it is marked or stored.

A request's tolerance (GenerationSpec.safety_tolerance, BFL's 0-6 scale) moves the score threshold: 2 is the
operator's ``safety_threshold``; above 2 it rises towards 1 (6: off); below 2 it falls (0: a third of it).
The operator caps what a request may ask for (``safety_max_tolerance``; 2 by default: no relaxing)."""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL.Image import Image

from ..errors import GenerationFailed

log = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 2
MAX_TOLERANCE = 6
FLAGGED_CODE = "content_moderated"


class Withheld(Exception):
    """The images were flagged: the job fails with FLAGGED_CODE and this message, nothing is stored."""


class SafetyChecker:
    def __init__(
        self, path: Path, *, threshold: float, labels: Sequence[str], max_tolerance: int, device: str = "cpu"
    ) -> None:
        if not (path / "config.json").is_file():
            raise ValueError(f"safety_model: {path} is not a model folder (no config.json)")
        self.path, self.threshold, self.max_tolerance, self.device = path, threshold, max_tolerance, device
        self.labels = {label.lower() for label in labels}
        self.counts: Counter[tuple[str]] = Counter()  # (flagged | passed | skipped,) -> n, for /metrics
        self._lock = threading.Lock()
        self._model: Any = None
        self._processor: Any = None
        self._unsafe: list[int] = []

    def threshold_for(self, tolerance: int) -> float | None:
        """The score at or above which an image is flagged; None: no check (tolerance 6)."""
        tolerance = max(0, min(tolerance, self.max_tolerance))
        if tolerance >= MAX_TOLERANCE:
            return None
        if tolerance >= DEFAULT_TOLERANCE:
            return self.threshold + (1 - self.threshold) * (tolerance - DEFAULT_TOLERANCE) / 4
        return self.threshold * (1 + tolerance) / 3

    def _load(self) -> None:
        """Once, on first use (a worker thread), never on an API node."""
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        processor = AutoImageProcessor.from_pretrained(self.path, local_files_only=True)
        model = AutoModelForImageClassification.from_pretrained(self.path, local_files_only=True).to(self.device)
        unsafe = [i for i, name in model.config.id2label.items() if str(name).lower() in self.labels]
        if not unsafe:
            raise ValueError(
                f"safety_model {self.path}: none of its labels {sorted(model.config.id2label.values())} is one of "
                f"safety_labels {sorted(self.labels)}"
            )
        self._processor, self._model, self._unsafe = processor, model.eval(), unsafe
        log.info("safety checker loaded from %s (unsafe labels %s)", self.path, sorted(self.labels))

    def scores(self, images: Sequence[Image]) -> list[float]:
        """Each image's probability of an unsafe label (the highest of them)."""
        import torch

        with self._lock:
            if self._model is None:
                self._load()
            inputs = self._processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
            with torch.inference_mode():
                logits = self._model(**inputs.to(self.device)).logits.float()
        probs = logits.softmax(dim=-1)[:, self._unsafe].amax(dim=-1)
        return [float(p) for p in probs]

    def check(self, images: Sequence[Image], tolerance: int) -> None:
        """Withheld when the images may not be delivered; GenerationFailed when the classifier could not run
        (the job fails: an image is never delivered unchecked)."""
        try:
            why = self.verdict(images, tolerance)
        except Exception as exc:  # loading or running the classifier: one clear failure of the job
            log.exception("the safety check failed")
            raise GenerationFailed(f"The safety check could not run: {type(exc).__name__}: {exc}") from exc
        if why is not None:
            raise Withheld(why)

    def verdict(self, images: Sequence[Image], tolerance: int) -> str | None:
        """Why the images may not be delivered (a message naming the score), or None when they may."""
        threshold = self.threshold_for(tolerance)
        worst = None if threshold is None else max(self.scores(images))
        flagged = threshold is not None and worst is not None and worst >= threshold
        with self._lock:
            self.counts[("skipped" if threshold is None else "flagged" if flagged else "passed",)] += 1
        if not flagged:
            return None
        return (
            f"NSFW content detected: the image was flagged by the safety checker (score {worst or 0:.2f}, "
            f"threshold {threshold or 0:.2f}) and not stored. Try a different prompt or seed."
        )
