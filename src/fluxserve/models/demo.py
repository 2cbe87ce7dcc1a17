"""Where the demo model's folders are and which names they serve: data the registry reads without torch.
``engine/demo`` builds the folders; each kind's folder is named in its ``Kind`` record."""

from __future__ import annotations

from pathlib import Path

from .families import KINDS, has_torchvision

DEMO_MARKER = "fluxserve-demo.json"
UPSAMPLER_FOLDER = "flux3-pup"  # FLUX 3's prompt upsampler (flux-3-image-klein-pup's role)
# Names whose real weights differ in kind of pipeline from their kind's folder get a folder of their own
# (FLUX.2 [dev]: Mistral 3 + PixtralProcessor, FLUX 3's base: another modular pipeline); both need torchvision.
FLUX2_DEV_FOLDER, FLUX3_BASE_FOLDER = "flux2-dev", "flux3-base"
WEIGHT_FOLDERS = {
    "black-forest-labs/FLUX.2-dev": FLUX2_DEV_FOLDER,
    "black-forest-labs/flux-3-image-klein-base": FLUX3_BASE_FOLDER,
}


def is_demo_model(path: Path) -> bool:
    return (path / DEMO_MARKER).is_file()


def demo_kinds() -> tuple[str, ...]:
    """The kinds the demo serves here: those needing torchvision only where it is installed."""
    return tuple(k.name for k in KINDS.values() if not k.needs_torchvision or has_torchvision())


def demo_upsampler(root: Path, kind: str) -> str:
    """FLUX 3's names get the demo's prompt upsampler (BFL: "do not use the model without it")."""
    return str(root / UPSAMPLER_FOLDER) if KINDS[kind].upsampler and has_torchvision() else ""


def demo_weights(root: Path, kind: str, weights: str = "") -> Path:
    """The folder that serves a name of this kind; FLUX.2 [dev]'s names and FLUX 3's base get their own where
    they can be built (FLUX.2 [dev]'s are served by the klein folder elsewhere)."""
    if weights in WEIGHT_FOLDERS and has_torchvision():
        return root / WEIGHT_FOLDERS[weights]
    return root / KINDS[kind].demo_folder
