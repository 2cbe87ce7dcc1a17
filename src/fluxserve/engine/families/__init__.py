"""The model families the engine runs: one module each, one line in this list."""

from __future__ import annotations

from ...models.families import KINDS
from . import flux1, flux2, flux3
from .base import EngineFamily

FAMILIES: dict[str, EngineFamily] = {f.name: f for f in (flux1.FAMILY, flux2.FAMILY, flux3.FAMILY)}


def for_kind(kind: str) -> EngineFamily:
    return FAMILIES[KINDS[kind].family]
