"""LoRA adapters a request names: where they come from, that they are safetensors, that they fit.

Sources, in the order a name is tried: an https URL (fetched through the guarded path, cached by
content hash), a file or sub-folder of the operator's LoRA folder, a hub id (``owner/repo``, from
the local cache when offline). Only safetensors are read: the header is plain JSON, so the check
needs no torch and never unpickles anything.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import secrets
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .errors import InvalidInput, PayloadTooLarge, StoreUnavailable
from .images import fetch_url
from .models import ModelSpec
from .spec import Adapter

MAX_ADAPTERS = 3
MIN_SCALE, MAX_SCALE = -1.0, 3.0
SUFFIX = ".safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Replicate's lora_weights also takes "huggingface.co/owner/name" without a scheme.
_HUB_URL = re.compile(r"^(?:https://)?(?:www\.)?huggingface\.co/([\w.-]+/[\w.-]+)/?$")
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
FETCH_TIMEOUT_S = 120.0
# Module names only one generation has (diffusers/PEFT format): the family an adapter was trained for.
_FLUX2_MARKERS = re.compile(r"to_qkv_mlp_proj|stream_modulation|\.ff(_context)?\.linear_(in|out)\b")
_FLUX1_MARKERS = re.compile(
    r"proj_mlp|\.ff(_context)?\.net\.|norm1(_context)?\.linear|single_transformer_blocks\.\d+\.attn\.to_[qkv]\b"
)
# Tensor names every adapter format has one of (PEFT/diffusers lora_A/B, Kohya lora_down/up, LyCORIS).
_ADAPTER_KEYS = ("lora", "lokr", "loha")


@dataclass(frozen=True)
class LoraRequest:
    """One adapter as a dialect parsed it; ``param`` names its field for errors."""

    source: str
    scale: float
    param: str
    scale_param: str | None = None


def check_requests(requests: list[LoraRequest], *, param: str) -> None:
    if len(requests) > MAX_ADAPTERS:
        raise InvalidInput(
            f"At most {MAX_ADAPTERS} LoRA adapters per request; got {len(requests)}.",
            param=param,
            code="too_many_loras",
        )
    for r in requests:
        if not r.source.strip():
            raise InvalidInput(f"{r.param} must name an adapter.", param=r.param)
        if not MIN_SCALE <= r.scale <= MAX_SCALE:
            raise InvalidInput(
                f"The scale of {r.source!r} must be between {MIN_SCALE:g} and {MAX_SCALE:g}; got {r.scale:g}.",
                param=r.scale_param or r.param,
            )


def read_header(path: Path) -> dict[str, Any]:
    """The safetensors JSON header (tensor names, dtypes, shapes); ValueError if it is not one."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError("too short")
        (length,) = struct.unpack("<Q", head)
        if not 2 <= length <= _MAX_HEADER or length > os.fstat(f.fileno()).st_size - 8:
            raise ValueError("no safetensors header")
        raw = f.read(length)
    header = json.loads(raw)
    if not isinstance(header, dict) or raw[:1] != b"{":
        raise ValueError("no safetensors header")
    return {k: v for k, v in header.items() if k != "__metadata__"}


def family(names: list[str]) -> str | None:
    """'flux2', 'flux1', or None where the names don't say (Kohya/BFL formats: diffusers converts them)."""
    if any(_FLUX2_MARKERS.search(n) for n in names):
        return "flux2"
    if any(_FLUX1_MARKERS.search(n) for n in names):
        return "flux1"
    return None


def _family_of(model: ModelSpec) -> str:
    return model.traits.family


_FAMILY_NAMES = {"flux1": "FLUX.1", "flux2": "FLUX.2", "flux3": "FLUX 3"}


HUB_METADATA_S = 20.0  # the hub's answer about a repo's files
WRITE_BYTES = 4 * 1024 * 1024  # a fetched adapter goes to disk in pieces this size


class LoraLibrary:
    """Resolves requested adapters to local files; keeps fetched ones in a size-capped LRU cache."""

    def __init__(
        self,
        lora_dir: Path | None,
        cache_dir: Path,
        *,
        cache_bytes: int,
        max_bytes: int,
        offline: bool,
        allow_private: bool,
        max_rank: int | None = None,
    ) -> None:
        self.max_rank = max_rank  # None: any rank; 0: adapters are off (--compile without hot-swap slots)
        self.lora_dir = lora_dir.resolve() if lora_dir else None
        self.cache_dir = cache_dir
        self.cache_bytes = cache_bytes
        self.max_bytes = max_bytes
        self.offline = offline
        self.allow_private = allow_private
        self._digests: dict[tuple[str, int, int], str] = {}
        self._lock = threading.Lock()
        # The hub's metadata calls block: two threads of their own, each call with a deadline, so slow
        # hub answers never hold the threads other requests run on.
        self._hub_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="fluxserve-hub")
        self.hub_endpoint: str | None = None  # None: huggingface_hub's (HF_ENDPOINT)

    def available(self) -> list[dict[str, Any]]:
        """The adapters in the LoRA folder, by the name a request uses."""
        if self.lora_dir is None or not self.lora_dir.is_dir():
            return []
        out = []
        for path in sorted(self.lora_dir.rglob(f"*{SUFFIX}")):
            try:
                fam = _FAMILY_NAMES.get(family(list(read_header(path))) or "")
            except (ValueError, UnicodeDecodeError, OSError):
                continue  # not loadable: requests naming it get the reason
            rel = path.relative_to(self.lora_dir).as_posix()
            out.append(
                {"name": rel.removesuffix(SUFFIX), "file": rel, "size_bytes": path.stat().st_size, "family": fam}
            )
        return out

    async def resolve(self, requests: list[LoraRequest], model: ModelSpec) -> tuple[Adapter, ...]:
        if requests and self.max_rank == 0:
            raise InvalidInput(
                "This server compiles its models (--compile) without LoRA hot-swap slots, so it takes no adapters; "
                "its operator can start it with --lora-max-rank.",
                param=requests[0].param,
                code="loras_unavailable",
            )
        adapters = []
        for r in requests:
            path = await self._locate(r)
            digest = await asyncio.to_thread(self._check, path, r, model)
            adapters.append(Adapter(source=r.source, digest=digest, path=str(path), scale=float(r.scale)))
        return tuple(adapters)

    def localize(self, adapters: tuple[Adapter, ...], model: ModelSpec) -> tuple[Adapter, ...]:
        """On a worker: adapters whose file is not on this machine (the API node that checked them fetched
        it into its own cache) fetched again here, from the same source; the content must be the same file."""
        out = []
        for a in adapters:
            if Path(a.path).is_file():
                out.append(a)
                continue
            request = LoraRequest(source=a.source, scale=a.scale, param="loras")
            (here,) = asyncio.run(self.resolve([request], model))
            if here.digest != a.digest:
                raise InvalidInput(f"The adapter at {a.source!r} changed since the job was accepted.", param="loras")
            out.append(here)
        return tuple(out)

    async def _locate(self, r: LoraRequest) -> Path:
        source = r.source.strip()
        hub = _HUB_URL.match(source)
        if hub:
            return await self._hub(hub.group(1), r)
        if source.startswith(("http://", "https://")):
            return await self._fetch(source, r)
        if "://" in source:
            raise InvalidInput(f"{r.param}: only https URLs, hub ids and LoRA-folder names are taken.", param=r.param)
        local = self._local(source, r)
        if local is not None:
            return local
        if _HUB_ID.match(source):
            return await self._hub(source, r)
        where = f"in the LoRA folder ({', '.join(a['name'] for a in self.available()[:10]) or 'empty'})"
        raise InvalidInput(f"{r.param}: no adapter {source!r} {where}, and it is not a hub id.", param=r.param)

    def _local(self, name: str, r: LoraRequest) -> Path | None:
        if self.lora_dir is None:
            return None
        if Path(name).is_absolute() or "\\" in name:
            raise InvalidInput(f"{r.param}: name a file inside the LoRA folder, not a path.", param=r.param)
        candidate = (self.lora_dir / name).resolve()
        if not candidate.is_relative_to(self.lora_dir):
            raise InvalidInput(f"{r.param}: {name!r} is outside the LoRA folder.", param=r.param)
        if not candidate.exists() and candidate.with_name(candidate.name + SUFFIX).is_file():
            candidate = candidate.with_name(candidate.name + SUFFIX)
        if candidate.is_dir():
            return _weights_in(candidate, r)
        return candidate if candidate.is_file() else None

    async def _hub(self, repo: str, r: LoraRequest) -> Path:
        """A hub repo's one adapter file: offline, from the local hub cache; online, its size read from the
        hub's metadata first (past ``max_bytes`` it is refused unfetched), then that one file fetched into
        the adapter cache like a URL adapter (size cap, one deadline, LRU eviction)."""
        loop = asyncio.get_running_loop()
        if self.offline:
            return await loop.run_in_executor(self._hub_pool, self._hub_cached, repo, r)
        try:
            name, size = await asyncio.wait_for(
                loop.run_in_executor(self._hub_pool, self._hub_file, repo, r), HUB_METADATA_S
            )
        except TimeoutError as exc:
            raise InvalidInput(
                f"{r.param}: the hub did not describe {repo!r} within {HUB_METADATA_S:g} s.", param=r.param
            ) from exc
        if size is not None and size > self.max_bytes:
            raise PayloadTooLarge(
                f"{r.param}: {repo}/{name} is {size} bytes; adapters may be at most {self.max_bytes} bytes.",
                param=r.param,
                code="file_too_large",
            )
        endpoint = self.hub_endpoint or _hub_endpoint()
        return await self._fetch(f"{endpoint}/{repo}/resolve/main/{quote(name)}", r)

    def _hub_file(self, repo: str, r: LoraRequest) -> tuple[str, int | None]:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError

        try:
            # Its own timeout a little past the deadline _hub waits: the deadline answers first, in one message
            # (with both equal, the client's timeout could win the race and escape as its own exception).
            hub = HfApi(endpoint=self.hub_endpoint)
            info = hub.model_info(repo, files_metadata=True, timeout=HUB_METADATA_S + 1.0)
        except (HfHubHTTPError, OSError, ValueError) as exc:
            raise InvalidInput(f"{r.param}: could not get {repo!r} from the hub ({exc}).", param=r.param) from exc
        sizes = {s.rfilename: s.size for s in info.siblings or []}
        return _adapter_file(sizes, r), sizes.get(_adapter_file(sizes, r))

    def _hub_cached(self, repo: str, r: LoraRequest) -> Path:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        try:
            folder = snapshot_download(repo, allow_patterns=[f"*{SUFFIX}"], local_files_only=True)
        except LocalEntryNotFoundError as exc:
            raise InvalidInput(
                f"{r.param}: the hub repo {repo!r} is not in the local cache, and this server is offline.",
                param=r.param,
            ) from exc
        except (HfHubHTTPError, OSError, ValueError) as exc:
            raise InvalidInput(f"{r.param}: could not get {repo!r} from the hub ({exc}).", param=r.param) from exc
        return _weights_in(Path(folder), r)

    async def _fetch(self, url: str, r: LoraRequest) -> Path:
        try:
            return await self._fetch_to_cache(url, r)
        except OSError as exc:  # a full disk or an unwritable cache is the server's trouble, not the request's
            raise StoreUnavailable(
                f"The server could not store the adapter ({exc.strerror or exc}); try again later."
            ) from exc

    async def _fetch_to_cache(self, url: str, r: LoraRequest) -> Path:
        self.cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.cache_dir / f".fetch-{secrets.token_hex(8)}"
        digest = hashlib.sha256()
        pending = bytearray()
        try:
            with open(tmp, "wb") as f:
                # Written off the event loop, a few MB at a time: a slow disk delays this fetch, not the server.
                async def sink(chunk: bytes) -> None:
                    digest.update(chunk)
                    pending.extend(chunk)
                    if len(pending) >= WRITE_BYTES:
                        await asyncio.to_thread(f.write, bytes(pending))
                        pending.clear()

                await fetch_url(
                    url,
                    sink,
                    param=r.param,
                    allow_private=self.allow_private,
                    max_bytes=self.max_bytes,
                    timeout_s=FETCH_TIMEOUT_S,
                    what="the adapter",
                    code="invalid_lora_url",
                )
                await asyncio.to_thread(f.write, bytes(pending))
            final = self.cache_dir / f"{digest.hexdigest()}{SUFFIX}"
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        await asyncio.to_thread(self._evict, keep=final)
        return final

    def _evict(self, keep: Path) -> None:
        """Least recently used first, until the cache fits its cap (the newest file always stays)."""
        files = sorted(self.cache_dir.glob(f"*{SUFFIX}"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        for path in files:
            if total <= self.cache_bytes:
                break
            if path != keep:
                total -= path.stat().st_size
                path.unlink(missing_ok=True)

    def _check(self, path: Path, r: LoraRequest, model: ModelSpec) -> str:
        """Safetensors, fits the model's generation; returns the file's sha256 (its identity)."""
        if path.suffix.lower() in _PICKLE_SUFFIXES:
            raise InvalidInput(
                f"{r.param}: {path.name} is a pickle file; only .safetensors adapters are loaded.",
                param=r.param,
                code="invalid_lora",
            )
        try:
            header = read_header(path)
            names = list(header)
        except (ValueError, UnicodeDecodeError, OSError) as exc:
            raise InvalidInput(
                f"{r.param}: {r.source!r} is not a safetensors file ({exc}); only .safetensors adapters are loaded.",
                param=r.param,
                code="invalid_lora",
            ) from exc
        if not any(k in n.lower() for n in names for k in _ADAPTER_KEYS):
            raise InvalidInput(f"{r.param}: {r.source!r} holds no LoRA weights.", param=r.param, code="invalid_lora")
        trained_for, serves = family(names), _family_of(model)
        if trained_for is not None and trained_for != serves:
            raise InvalidInput(
                f"{r.param}: {r.source!r} is a {_FAMILY_NAMES[trained_for]} adapter; {model.name} is a "
                f"{_FAMILY_NAMES[serves]} model.",
                param=r.param,
                code="lora_model_mismatch",
            )
        rank = max(
            (min(v.get("shape") or [0]) for k, v in header.items() if "lora_A" in k or "lora_down" in k), default=0
        )
        if self.max_rank and rank > self.max_rank:
            raise InvalidInput(
                f"{r.param}: {r.source!r} has rank {rank}; this server's hot-swap slots take rank {self.max_rank} "
                "at most (--lora-max-rank).",
                param=r.param,
                code="invalid_lora",
            )
        if path.parent == self.cache_dir:
            path.touch()  # used: the last to be evicted
        return self._digest(path)

    def _digest(self, path: Path) -> str:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        with self._lock:
            if key in self._digests:
                return self._digests[key]
        if path.parent == self.cache_dir:
            digest = path.name.removesuffix(SUFFIX)  # cached files are named by their hash
        else:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            digest = h.hexdigest()
        with self._lock:
            self._digests[key] = digest
        return digest


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return str(constants.ENDPOINT).rstrip("/")


def _adapter_file(files: dict[str, int | None], r: LoraRequest) -> str:
    """The one adapter file of a repo's listing, by the rule _weights_in applies to a folder."""
    if f"pytorch_lora_weights{SUFFIX}" in files:
        return f"pytorch_lora_weights{SUFFIX}"
    found = sorted(n for n in files if n.endswith(SUFFIX))
    if len(found) == 1:
        return found[0]
    if not found:
        pickles = [n for n in files if Path(n).suffix.lower() in _PICKLE_SUFFIXES]
        hint = f" (it has {', '.join(pickles)}: pickle files are not loaded)" if pickles else ""
        raise InvalidInput(f"{r.param}: no .safetensors adapter in {r.source!r}{hint}.", param=r.param)
    raise InvalidInput(
        f"{r.param}: {r.source!r} holds several .safetensors files; name one: " + ", ".join(found[:10]),
        param=r.param,
    )


def _weights_in(folder: Path, r: LoraRequest) -> Path:
    """A diffusers LoRA folder's weights: pytorch_lora_weights.safetensors, or its one .safetensors."""
    preferred = folder / f"pytorch_lora_weights{SUFFIX}"
    if preferred.is_file():
        return preferred
    files = sorted(folder.glob(f"*{SUFFIX}"))
    if len(files) == 1:
        return files[0]
    if not files:
        pickles = [p.name for p in folder.iterdir() if p.suffix.lower() in _PICKLE_SUFFIXES]
        hint = f" (it has {', '.join(pickles)}: pickle files are not loaded)" if pickles else ""
        raise InvalidInput(f"{r.param}: no .safetensors adapter in {r.source!r}{hint}.", param=r.param)
    raise InvalidInput(
        f"{r.param}: {r.source!r} holds several .safetensors files; name one: " + ", ".join(p.name for p in files[:10]),
        param=r.param,
    )
