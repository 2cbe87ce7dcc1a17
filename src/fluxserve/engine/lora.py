"""LoRA adapters on a loaded pipeline: the last N stay resident, a call activates its own set.

Adapters are never fused into the shared weights: a request without adapters runs the base model
exactly (LoRA layers disabled), and switching between resident adapters is only ``set_adapters``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import GenerationFailed
from ..spec import Adapter

log = logging.getLogger(__name__)


class AdapterSlots:
    """Adapters loaded into one transformer, least recently used first."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._resident: OrderedDict[str, str] = OrderedDict()  # adapter name -> source, for logs
        self.loads = 0  # adapter files read into the pipeline (switching between resident ones reads none)

    @property
    def resident(self) -> list[str]:
        return list(self._resident)

    def activate(self, pipe: Any, adapters: Sequence[Adapter]) -> None:
        if not adapters:
            if self._resident:
                pipe.disable_lora()
            return
        if len({a.digest for a in adapters}) > self.slots:
            raise GenerationFailed(f"This request names more adapters than the {self.slots} LoRA slots.")
        wanted = {a.name for a in adapters}
        for adapter in adapters:
            if adapter.name in self._resident:
                self._resident.move_to_end(adapter.name)
                continue
            while len(self._resident) >= self.slots:
                old = next(n for n in self._resident if n not in wanted)
                pipe.delete_adapters(old)
                log.info("LoRA %s (%s) unloaded to make room", old, self._resident.pop(old))
            self._load(pipe, adapter)
        pipe.enable_lora()
        # One adapter named twice in a request counts once, with the scales added.
        scales: dict[str, float] = {}
        for a in adapters:
            scales[a.name] = scales.get(a.name, 0.0) + a.scale
        pipe.set_adapters(list(scales), adapter_weights=list(scales.values()))

    def _load(self, pipe: Any, adapter: Adapter) -> None:
        if not Path(adapter.path).is_file():
            raise GenerationFailed(
                f"The LoRA adapter {adapter.source!r} is no longer on this server (its cache was evicted); "
                "send the request again."
            )
        try:
            pipe.load_lora_weights(adapter.path, adapter_name=adapter.name)
        except (ValueError, RuntimeError, KeyError) as exc:  # shapes or keys that do not fit this model
            if adapter.name in (pipe.get_list_adapters().get("transformer") or []):
                pipe.delete_adapters(adapter.name)
            raise GenerationFailed(f"The LoRA adapter {adapter.source!r} does not fit this model: {exc}") from exc
        self._resident[adapter.name] = adapter.source
        self.loads += 1
        log.info("LoRA %s loaded from %s", adapter.name, adapter.source)
