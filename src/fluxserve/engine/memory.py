"""The device's memory ledger: which pipelines are resident, what they take, what they share, who goes next.

Each loaded pipeline is an ``Entry`` of components (``inventory.Part``: content key + bytes). A component the
entries share is one module object, counted once. When a load needs room, the least recently used entries
that are not pinned (preloaded) go to the CPU tier: their components that no resident entry
still uses move to host memory, so warming them again is a copy, not a disk read. The tier has its own
budget; past it, its least recently used entries are dropped. On a CPU device both are host memory: the
ledger still keeps the device budget, and the tier keeps objects that need no reload.

No locking here: the engine holds its lock around every call, and a job holds it while it runs, so nothing
is moved off the device under a running job.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..errors import GenerationFailed
from ..sizes import human_bytes
from .inventory import Part

log = logging.getLogger(__name__)
GiB = 1024**3


@dataclass
class Entry:
    key: Hashable
    pipe: Any
    parts: dict[str, Part]  # by component name
    offload: str = "none"  # placement: "model" / "group" keep weights on the host between calls
    on_device: bool = True
    pinned: bool = False
    last_used: float = field(default_factory=time.monotonic)

    def resident(self) -> list[Part]:
        """What it holds on the device between calls: everything, or under model offload its largest part
        while one runs (counted as held), or under group offload nothing."""
        if self.offload == "none":
            return list(self.parts.values())
        if self.offload == "model" and self.parts:
            biggest = max(self.parts.values(), key=lambda p: p.nbytes)
            return [Part(name=biggest.name, key=f"{biggest.key}@offload:{id(self)}", nbytes=biggest.nbytes)]
        return []


def module_bytes(module: Any) -> int:
    """Parameters and buffers, as loaded."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def measured(key: Hashable, pipe: Any, expected: list[Part] | None) -> dict[str, Part]:
    """The entry's parts as loaded: the inventory's keys, bytes from the modules themselves (a model that keeps
    some layers in fp32, as T5 does, takes more than its dtype says); a component the inventory could not
    read gets a key of its own, never shared."""
    import torch

    known = {p.name: p for p in expected or []}
    parts: dict[str, Part] = {}
    for name, module in _modules(pipe).items():
        if not isinstance(module, torch.nn.Module):
            continue
        identity = known[name].key if name in known else f"{key!r}/{name}"
        parts[name] = Part(name=name, key=identity, nbytes=module_bytes(module))
    return parts


def _modules(pipe: Any) -> dict[str, Any]:
    components = dict(getattr(pipe, "components", {}) or {})
    upsampling = getattr(pipe, "fluxserve_upsampling", None)  # FLUX 3's prompt upsampler: its own model
    if upsampling is not None:
        components["prompt_upsampler"] = upsampling.components.get("prompt_upsampler")
    return components


class Pool:
    def __init__(self, device: str, budget: int, cpu_budget: int) -> None:
        self.device = device
        self.budget = budget
        self.cpu_budget = cpu_budget
        self.entries: dict[Hashable, Entry] = {}
        self.evictions: list[Hashable] = []  # each entry sent off the device, in order (tests, logs)
        self.on_evict: Callable[[Entry], None] = lambda entry: None
        self.on_drop: Callable[[Entry], None] = lambda entry: None  # before its references go

    # -- the ledger -------------------------------------------------------------

    def all(self) -> list[Entry]:
        """A snapshot: /health reads the ledger from the HTTP threads while the worker's thread changes it
        (list() of a dict's values runs without giving up the GIL; a generator over it would not)."""
        return list(self.entries.values())

    def _keys(self, entries: Iterable[Entry]) -> dict[str, int]:
        return {p.key: p.nbytes for e in entries for p in e.resident()}

    def used_bytes(self) -> int:
        return sum(self._keys(e for e in self.all() if e.on_device).values())

    def cpu_bytes(self) -> int:
        device = self._keys(e for e in self.all() if e.on_device)
        tier = self._keys(e for e in self.all() if not e.on_device)
        return sum(n for k, n in tier.items() if k not in device)

    def need(self, parts: list[Part], offload: str = "none") -> int:
        """Bytes a load or re-warm adds on the device: its parts not already resident."""
        probe = Entry(key=None, pipe=None, parts={p.name: p for p in parts}, offload=offload)
        device = self._keys(e for e in self.all() if e.on_device)
        return sum(p.nbytes for p in probe.resident() if p.key not in device)

    def shared(self, parts: list[Part]) -> dict[str, Any]:
        """Modules already loaded (on the device or in the tier) for these parts, by component name."""
        by_key: dict[str, Any] = {}
        for entry in self.all():
            if entry.offload != "none":
                continue  # offload hooks are attached to those modules: they stay that pipeline's
            modules = _modules(entry.pipe)
            for part in entry.parts.values():
                by_key.setdefault(part.key, modules.get(part.name))
        return {p.name: by_key[p.key] for p in parts if by_key.get(p.key) is not None}

    # -- making room ------------------------------------------------------------

    def make_room(self, parts: list[Part], offload: str, *, for_key: Hashable, label: str) -> None:
        """Send least recently used entries to the tier until ``parts`` fit the budget beside what stays
        (what they share with an entry sent away is counted again: it then has to be on the device for them)."""
        while self.used_bytes() + (need := self.need(parts, offload)) > self.budget:
            movable = [e for e in self.all() if e.on_device and not e.pinned and e.key != for_key]
            if not movable:
                held = self.used_bytes()
                raise GenerationFailed(
                    f"{label} needs {human_bytes(need)} more on the device; the memory budget is "
                    f"{human_bytes(self.budget)} and {human_bytes(held)} of it is held by preloaded or "
                    "running models. Raise --memory-budget, preload fewer names, or choose an --offload mode."
                )
            self.to_tier(min(movable, key=lambda e: e.last_used))

    def to_tier(self, entry: Entry) -> None:
        """Off the device: components no resident entry still uses move to host memory."""
        entry.on_device = False
        self.evictions.append(entry.key)
        self.on_evict(entry)
        staying = self._keys(e for e in self.all() if e.on_device)
        if self.device != "cpu" and entry.offload == "none":
            modules = _modules(entry.pipe)
            for part in entry.parts.values():
                if part.key not in staying and modules.get(part.name) is not None:
                    modules[part.name].to("cpu")
        log.info("model %r moved off the device (%s in use)", entry.key, human_bytes(self.used_bytes()))
        self.trim_tier()

    def trim_tier(self) -> None:
        while self.cpu_bytes() > self.cpu_budget:
            tier = [e for e in self.all() if not e.on_device]
            if not tier:
                return
            self.drop(min(tier, key=lambda e: e.last_used))

    def drop(self, entry: Entry) -> None:
        """Forget it: what only it used is freed when the last reference goes."""
        del self.entries[entry.key]
        log.info("model %r unloaded", entry.key)
        self.on_drop(entry)
        entry.pipe = None
        gc.collect()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def add(self, entry: Entry) -> None:
        self.entries[entry.key] = entry
        self.touch(entry.key)

    def touch(self, key: Hashable) -> None:
        self.entries[key].last_used = time.monotonic()


def default_budgets(device: str) -> tuple[int, int]:
    """(device budget, host tier budget) when not set: a GPU's free memory at start less room for activations;
    on CPU half the RAM for pipelines; the tier a quarter of the RAM."""
    ram = _ram_bytes()
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return max(0, free - ACTIVATIONS), ram // 4
    return ram // 2, ram // 4


ACTIVATIONS = 6 * GiB  # activations and the VAE decode at 1-2 MP (as speed.place's automatic offload)


def _ram_bytes() -> int:
    import os

    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 16 * GiB
