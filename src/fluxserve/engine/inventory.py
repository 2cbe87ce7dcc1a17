"""What a pipeline's weights take in memory, and which of its components are the same weights as another's,
known before any weight is read: model_index.json (or a modular pipeline's index), each component's config and
its safetensors headers, a few kilobytes per file, from a local folder or the hub cache.

A component's identity is its content, never its name: the config plus, for each weight file, its size, its
header (every tensor's name, dtype, shape and offsets) and a sample of its bytes spread over the file, so two
fine-tunes of one architecture (same header, same size) are still two components.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Floating tensors load in the pipeline's dtype; the others (fp8 scales, int indices) as they are stored.
_FLOATING = ("F64", "F32", "F16", "BF16")
_ITEM_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}
_SAMPLES, _SAMPLE_BYTES = 8, 4096
_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit
CONFIGS = ("config.json", "generation_config.json")  # part of a component's identity


@dataclass(frozen=True)
class Part:
    name: str  # the pipeline's name for it ("text_encoder_2")
    key: str  # content identity: equal keys are the same weights, loaded once
    nbytes: int  # resident size at the load dtype


def _cached_folder(repo: str) -> Path | None:
    """A hub repository's snapshot in the local cache, or None (not downloaded yet)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError):
        return None


def is_hub_id(weights: str) -> bool:
    """``org/name`` that is not a folder here: a hub repository."""
    local = weights.startswith((".", "/", "~")) or Path(weights).exists()
    return bool(weights) and weights.count("/") == 1 and not local


def folder_of(weights: str) -> Path | None:
    path = Path(weights)
    if path.is_dir():
        return path
    return _cached_folder(weights) if is_hub_id(weights) else None


def weight_names(names: list[str], read_text: Callable[[str], str]) -> list[str]:
    """The safetensors files from_pretrained reads among a component folder's file ``names`` (sharded ones
    through their index, read with ``read_text``): the same rule for a local folder and a hub listing."""
    for index in sorted(n for n in names if n.endswith(".safetensors.index.json")):
        if ".fp16." in index:  # a variant: from_pretrained only reads it when asked
            continue
        return sorted(set(json.loads(read_text(index)).get("weight_map", {}).values()))
    return sorted(n for n in names if n.endswith(".safetensors") and n.count(".") == 1)


def _weight_files(folder: Path) -> list[Path]:
    names = [p.name for p in folder.iterdir() if p.is_file()]
    return [folder / n for n in weight_names(names, lambda n: (folder / n).read_text())]


def _unfinished(folder: Path) -> bool:
    """A model's folder (it has a config.json) without its weights yet: a download cut off."""
    weights = [*folder.glob("*.safetensors"), *folder.glob("*.bin"), *folder.glob("*.safetensors.index.json")]
    return (folder / "config.json").is_file() and not weights


Reader = Callable[[int, int], bytes]  # (offset, size) -> those bytes of one file (fewer at its end)


def header_of(read: Reader, where: str) -> tuple[bytes, int]:
    """A safetensors file's JSON header and where its data starts."""
    (length,) = struct.unpack("<Q", read(0, 8))
    if length > _MAX_HEADER:
        raise ValueError(f"{where}: not a safetensors file (header of {length} bytes)")
    return read(8, length), 8 + length


def samples_of(read: Reader, start: int, size: int) -> bytes:
    """A few kilobytes spread over the data: two files with one header but other values differ here."""
    body = size - start
    if body <= 0:
        return b""
    return b"".join(read(start + body * i // _SAMPLES, _SAMPLE_BYTES) for i in range(_SAMPLES))


def identity(digest: Any, size: int, read: Reader, where: str, item_bytes: int) -> int:
    """Feed one weight file's identity into ``digest``; its resident bytes at ``item_bytes`` per element."""
    header, start = header_of(read, where)
    digest.update(struct.pack("<Q", size) + header + samples_of(read, start, size))
    return _tensor_bytes(header, item_bytes)


def _tensor_bytes(header: bytes, item_bytes: int) -> int:
    total = 0
    for name, entry in json.loads(header).items():
        if name == "__metadata__":
            continue
        numel = 1
        for dim in entry["shape"]:
            numel *= dim
        if entry["dtype"] in _FLOATING:
            total += numel * item_bytes
        else:
            start, end = entry["data_offsets"]
            total += end - start
    return total


def component(name: str, folder: Path, item_bytes: int) -> Part | None:
    """One component's identity and size, or None when it has no safetensors weights (a tokenizer, a
    scheduler; or weights in another format, sized after loading instead)."""
    files = _weight_files(folder)
    if not files:
        return None
    digest = hashlib.sha256()
    for config in CONFIGS:
        if (folder / config).is_file():
            digest.update((folder / config).read_bytes())
    nbytes = 0
    for path in files:
        with path.open("rb") as f:

            def read(offset: int, size: int, f: Any = f) -> bytes:
                f.seek(offset)
                return bytes(f.read(size))

            nbytes += identity(digest, path.stat().st_size, read, str(path), item_bytes)
    return Part(name=name, key=digest.hexdigest(), nbytes=nbytes)


def classic_components(index: dict[str, Any]) -> list[str]:
    """The components a model_index.json names with a class (not the ``_class_name`` and the like)."""
    return [n for n, v in index.items() if not n.startswith("_") and isinstance(v, list) and v and v[0] is not None]


def _component_folders(folder: Path) -> dict[str, Path]:
    """Each weight-carrying component's folder, as the pipeline's index names it."""
    out: dict[str, Path] = {}
    classic = folder / "model_index.json"
    if classic.is_file():
        return {name: folder / name for name in classic_components(json.loads(classic.read_text()))}
    modular = folder / "modular_model_index.json"
    if modular.is_file():
        for name, value in json.loads(modular.read_text()).items():
            spec = value[2] if isinstance(value, list) and len(value) > 2 and isinstance(value[2], dict) else None
            if spec and spec.get("pretrained_model_name_or_path"):
                base = folder_of(str(spec["pretrained_model_name_or_path"]))
                # Another repository not downloaded yet: a folder that is not there, so not ready to size.
                out[name] = (base or folder / ".missing" / name) / (spec.get("subfolder") or "")
    return out


def inventory(weights: str, item_bytes: int, *, extra: dict[str, str] | None = None) -> list[Part] | None:
    """Every weight-carrying component of the pipeline at ``weights`` (a folder or a cached hub id), or None
    when its files are not all here yet (a hub repository not downloaded, or only its index: fetched and
    sized when first needed). ``extra`` adds components from folders of their own (FLUX 3's upsampler)."""
    folder = folder_of(weights)
    if folder is None:
        return None
    folders = _component_folders(folder)
    for name, path in (extra or {}).items():
        found = folder_of(path)
        if found is None:
            return None
        folders[name] = found
    if any(not path.is_dir() or _unfinished(path) for path in folders.values()):
        return None
    parts = [component(name, path, item_bytes) for name, path in sorted(folders.items())]
    return [p for p in parts if p is not None]
