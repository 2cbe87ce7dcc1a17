"""Public model names: what each is (spec), the defaults (catalog), the served set (registry), the pipeline
kinds as data (families), the demo's folders (demo) and the upstream providers names route to (upstreams)."""

from .catalog import DEFAULT_MODELS
from .registry import ModelRegistry
from .spec import DEFAULT_STRENGTH, ModelSpec, PipelineKind

__all__ = ["DEFAULT_MODELS", "DEFAULT_STRENGTH", "ModelRegistry", "ModelSpec", "PipelineKind"]
