"""The provider kinds by name: ``[upstreams.NAME] kind = ...``."""

from __future__ import annotations

from ..models.upstreams import UpstreamConfig
from .base import Provider
from .bfl import BFL
from .fal import Fal
from .openai import OpenAI
from .replicate import Replicate

PROVIDERS: dict[str, type[Provider]] = {"bfl": BFL, "replicate": Replicate, "fal": Fal, "openai": OpenAI}


def provider_for(config: UpstreamConfig) -> Provider:
    return PROVIDERS[config.kind](config)
