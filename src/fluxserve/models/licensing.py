"""``[licensing.bfl]`` in the model config file: which names run weights under BFL's self-hosted commercial
licence, the slug each is reported as, where, and with which key (its environment variable's name)::

    [licensing.bfl]
    key_env = "BFL_LICENSE_KEY"            # default; the x-key sent with each report
    base_url = "https://api.bfl.ai"        # default
    interval_s = 60                        # how often counts are sent (default 60)
    [licensing.bfl.models]
    flux-dev = "flux-1-dev"
    flux-kontext = "flux-1-kontext-dev"
    flux-fill = "flux-tools"
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_SLUG = re.compile(r"[a-z0-9][a-z0-9.-]{0,63}")
_KEYS = {"key_env", "base_url", "interval_s", "lease_s", "models"}


@dataclass(frozen=True)
class BflLicensing:
    slugs: dict[str, str] = field(default_factory=dict)  # model name -> BFL slug
    key_env: str = "BFL_LICENSE_KEY"
    base_url: str = "https://api.bfl.ai"
    interval_s: float = 60.0
    lease_s: float = 60.0  # a batch a sender took but never acknowledged is sent again (same id) after this

    def url(self, slug: str) -> str:
        return f"{self.base_url.rstrip('/')}/v1/licenses/models/{slug}/usage"


def parse_licensing(path: Path | None, names: set[str]) -> BflLicensing | None:
    """The table from the model config file (None: not there), checked against the registry's ``names``."""
    if path is None:
        return None
    with open(path, "rb") as f:
        table: dict[str, Any] = tomllib.load(f).get("licensing", {}).get("bfl")
    if table is None:
        return None
    where = f"{path}: [licensing.bfl]"
    unknown = set(table) - _KEYS
    if unknown:
        raise ValueError(f"{where} has unknown keys {sorted(unknown)}; allowed: {sorted(_KEYS)}")
    slugs = table.get("models", {})
    if not isinstance(slugs, dict) or not slugs:
        raise ValueError(f'{where}: give [licensing.bfl.models], each name = its BFL slug (flux-dev = "flux-1-dev")')
    for name, slug in slugs.items():
        if name not in names:
            raise ValueError(f"{where}.models: {name!r} is not a model name here ({', '.join(sorted(names))})")
        if not isinstance(slug, str) or not _SLUG.fullmatch(slug):
            raise ValueError(f"{where}.models.{name}: {slug!r} is not a BFL model slug (such as flux-1-dev)")
    licensing = BflLicensing(dict(slugs), **{k: v for k, v in table.items() if k != "models"})
    if not licensing.base_url.startswith(("https://", "http://")):
        raise ValueError(f"{where}: base_url must be an http(s) URL; got {licensing.base_url!r}")
    if not licensing.interval_s > 0 or not licensing.lease_s > 0:
        raise ValueError(f"{where}: interval_s and lease_s must be positive")
    return licensing
