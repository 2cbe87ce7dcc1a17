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
from ..loras import MAX_ADAPTERS
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

    def deactivate(self, pipe: Any) -> None:
        """After each call: the next one, with or without adapters, starts from the base model."""
        if self._resident:
            pipe.disable_lora()

    def _load(self, pipe: Any, adapter: Adapter) -> None:
        _check_present(adapter)
        try:
            pipe.load_lora_weights(adapter.path, adapter_name=adapter.name)
        except (ValueError, RuntimeError, KeyError) as exc:  # shapes or keys that do not fit this model
            if adapter.name in (pipe.get_list_adapters().get("transformer") or []):
                pipe.delete_adapters(adapter.name)
            raise GenerationFailed(f"The LoRA adapter {adapter.source!r} does not fit this model: {exc}") from exc
        self._resident[adapter.name] = adapter.source
        self.loads += 1
        log.info("LoRA %s loaded from %s", adapter.name, adapter.source)


class HotswapSlots:
    """Under --compile: a fixed set of adapter slots, always active at weight 1, refilled by hot-swap.

    The compiled graph sees the same LoRA layers on every call, so a new adapter or scale is a copy
    of its weights into a slot (milliseconds), never a recompile. A slot a request does not use holds
    zeros. The adapters' tensors stay in host memory, the last ``cached`` of them.
    """

    def __init__(self, pipe: Any, *, rank: int, cached: int) -> None:
        import torch

        self.rank = rank
        self.cached = cached
        self.loads = 0
        # Every linear layer of the blocks: the targets an adapter may have (before LoRA wraps them).
        self._shapes = [
            (name, m.in_features, m.out_features)
            for name, m in pipe.transformer.named_modules()
            if isinstance(m, torch.nn.Linear) and "transformer_blocks." in name
        ]
        self.names = [f"slot{i}" for i in range(MAX_ADAPTERS)]
        pipe.enable_lora_hotswap(target_rank=rank)
        for name in self.names:
            pipe.load_lora_weights(self._zeros(), adapter_name=name)
        pipe.set_adapters(self.names, adapter_weights=[1.0] * len(self.names))
        self._filled: list[tuple[str, float] | None] = [None] * len(self.names)  # (digest, scale) or zeros
        self._tensors: OrderedDict[str, dict[str, Any]] = OrderedDict()

    @property
    def resident(self) -> list[str]:
        return list(self._tensors)

    def _zeros(self) -> dict[str, Any]:
        import torch

        # Fresh tensors each time: a loaded adapter may keep the very tensors it was given.
        out: dict[str, Any] = {}
        for name, fan_in, fan_out in self._shapes:
            out[f"transformer.{name}.lora_A.weight"] = torch.zeros(self.rank, fan_in)
            out[f"transformer.{name}.lora_B.weight"] = torch.zeros(fan_out, self.rank)
        return out

    def activate(self, pipe: Any, adapters: Sequence[Adapter]) -> None:
        scales: dict[str, float] = {}
        by_digest = {}
        for a in adapters:
            scales[a.digest] = scales.get(a.digest, 0.0) + a.scale
            by_digest[a.digest] = a
        wanted = list(scales.items())
        target: list[tuple[str, float] | None] = [f if f in wanted else None for f in self._filled]
        for item in wanted:
            if item not in target:
                target[target.index(None)] = item
        for i, (old, new) in enumerate(zip(self._filled, target, strict=True)):
            if old == new:
                continue
            self._filled[i] = None  # until the copy has succeeded
            if new is None:
                weights = self._zeros()
            else:
                digest, scale = new
                # lora_B (Kohya: lora_up) times the scale: the slot's own weight stays 1.
                weights = {
                    k: v * scale if ("lora_B" in k or "lora_up" in k) else v.clone()
                    for k, v in self._adapter_tensors(by_digest[digest]).items()
                }
            try:
                pipe.load_lora_weights(weights, adapter_name=self.names[i], hotswap=True)
            except (ValueError, RuntimeError, KeyError) as exc:
                source = by_digest[new[0]].source if new else "zeros"
                raise GenerationFailed(
                    f"The LoRA adapter {source!r} does not fit this model's hot-swap slots "
                    f"(rank at most {self.rank}, linear layers of the blocks only): {exc}"
                ) from exc
            self._filled[i] = new

    def deactivate(self, pipe: Any) -> None:
        """Nothing: the slots stay in the compiled graph; the next call zeroes the ones it does not use."""

    def _adapter_tensors(self, adapter: Adapter) -> dict[str, Any]:
        if adapter.digest in self._tensors:
            self._tensors.move_to_end(adapter.digest)
            return self._tensors[adapter.digest]
        _check_present(adapter)
        from safetensors.torch import load_file

        self._tensors[adapter.digest] = load_file(adapter.path)
        self.loads += 1
        while len(self._tensors) > self.cached:
            self._tensors.popitem(last=False)
        return self._tensors[adapter.digest]


def _check_present(adapter: Adapter) -> None:
    if not Path(adapter.path).is_file():
        raise GenerationFailed(
            f"The LoRA adapter {adapter.source!r} is no longer on this server (its cache was evicted); "
            "send the request again."
        )
