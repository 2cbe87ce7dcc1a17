"""A hub repository's pipeline sized before anything is downloaded, when the server is online: the file listing,
then the index, each component's config and, per weight file, its safetensors header and the same few sampled
kilobytes inventory.py reads from a local file, fetched with Range requests. The sizes and content identities
are the ones inventory.py computes once the files are here, so a name that can never fit the budget is refused
at start, and ``/v1/models`` shows what a name needs before its first job downloads it.

Classic pipelines only (a ``model_index.json``): a modular pipeline's index names other repositories, sized
once they are here.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from .inventory import CONFIGS, Part, classic_components, identity, weight_names


def listed(repo: str, item_bytes: int) -> list[Part] | None:
    """The repository's weight-carrying components, or None when it is not a classic diffusers pipeline.
    Raises on a network or hub error (the caller decides what an unreachable hub means)."""
    import httpx
    from huggingface_hub import HfApi, hf_hub_url
    from huggingface_hub.hf_api import RepoFile
    from huggingface_hub.utils._headers import build_hf_headers

    api = HfApi()
    commit = str(api.repo_info(repo, revision="main").sha)
    sizes = {
        f.path: int(f.size)
        for f in api.list_repo_tree(repo, recursive=True, revision=commit)
        if isinstance(f, RepoFile)
    }
    if "model_index.json" not in sizes:
        return None
    with httpx.Client(headers=build_hf_headers(), follow_redirects=True, timeout=30) as client:

        def get(path: str, offset: int | None = None, size: int = 0) -> bytes:
            ranged = {} if offset is None else {"Range": f"bytes={offset}-{offset + size - 1}"}
            with client.stream("GET", hf_hub_url(repo, path, revision=commit), headers=ranged) as response:
                response.raise_for_status()
                if offset is not None and response.status_code != 206:  # not reading gigabytes to size them
                    raise RuntimeError(f"{repo}/{path}: the hub answered a Range request with the whole file")
                return response.read()

        parts = []
        for name in classic_components(json.loads(get("model_index.json"))):
            prefix = f"{name}/"
            names = [p[len(prefix) :] for p in sizes if p.startswith(prefix) and "/" not in p[len(prefix) :]]

            def text(file: str, prefix: str = prefix) -> str:
                return get(prefix + file).decode()

            files = weight_names(names, text)
            if not files:
                continue  # a tokenizer, a scheduler
            digest: Any = hashlib.sha256()
            for config in CONFIGS:
                if prefix + config in sizes:
                    digest.update(get(prefix + config))
            nbytes = 0
            for file in files:
                path = prefix + file

                def read(offset: int, size: int, path: str = path) -> bytes:
                    return get(path, offset, size)

                nbytes += identity(digest, sizes[path], read, f"{repo}/{path}", item_bytes)
            parts.append(Part(name=name, key=digest.hexdigest(), nbytes=nbytes))
    return parts
