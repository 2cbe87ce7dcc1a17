"""Hub weights fetched when a name first needs them (at start only when preloaded).

The free disk is checked against what is still missing before anything is fetched. Each file streams into
the hub cache's own layout (``blobs/<etag>``, ``snapshots/<commit>/<path>``, ``refs/main``), so diffusers and
``huggingface-cli`` find it there; a file in flight is ``blobs/<etag>.part``, a stable name, so a download a
crash (kill -9) cut off resumes with a Range request where it stopped (huggingface_hub 2.x writes each download
to a per-process temporary file and starts over). One download per file however many jobs or processes wait:
a file lock per blob. Only a diffusers folder's own files are fetched: FLUX repositories also carry
single-file checkpoints that would double the download.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..sizes import human_bytes

log = logging.getLogger(__name__)

PATTERNS = ("model_index.json", "modular_model_index.json", "*/*")  # the index and the component folders


@dataclass
class Progress:
    repo: str
    total_bytes: int
    done_bytes: int = 0

    def line(self, name: str) -> str:
        share = self.done_bytes / self.total_bytes if self.total_bytes else 1.0
        done, total = human_bytes(self.done_bytes), human_bytes(self.total_bytes)
        return f"downloading {self.repo} for {name}: {done} of {total} ({share:.0%})"


def _free_bytes(path: Path) -> int:
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


class Downloads:
    def __init__(self, parallel: int = 4) -> None:
        self.active: dict[str, Progress] = {}  # by repository, while it downloads (/health)
        self._lock = threading.Lock()
        self._parallel = parallel

    def fetch(self, repo: str, on_progress: Callable[[Progress], None], every_s: float = 1.0) -> Path:
        """The repository's snapshot folder once its files are here; raises RuntimeError with the reason."""
        from huggingface_hub import HfApi, constants
        from huggingface_hub.file_download import repo_folder_name
        from huggingface_hub.hf_api import RepoFile

        with self._lock:  # one repository at a time: a second caller finds the first one's files
            api = HfApi()
            commit = str(api.repo_info(repo, revision="main").sha)
            files = [
                f
                for f in api.list_repo_tree(repo, recursive=True, revision=commit)
                if isinstance(f, RepoFile) and any(fnmatch.fnmatch(f.path, p) for p in PATTERNS)
            ]
            root = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model")
            have = {f.path: _have(root, f) for f in files}
            progress = Progress(repo, sum(f.size for f in files), sum(have.values()))
            missing, free = progress.total_bytes - progress.done_bytes, _free_bytes(root)
            if missing > free:
                raise RuntimeError(
                    f"downloading {repo} needs {human_bytes(missing)} more on disk; {human_bytes(free)} is free "
                    f"at {root.parent} (HF_HUB_CACHE)"
                )
            log.info("downloading %s: %s in %d files", repo, human_bytes(missing), len(files))
            self.active[repo] = progress
            counted = threading.Lock()

            def add(n: int) -> None:
                with counted:
                    progress.done_bytes += n

            stop = threading.Event()

            def watch() -> None:
                while not stop.wait(every_s):
                    on_progress(progress)

            watcher = threading.Thread(target=watch, name="fluxserve-download", daemon=True)
            watcher.start()
            try:
                with ThreadPoolExecutor(self._parallel, thread_name_prefix="fluxserve-fetch") as pool:
                    list(pool.map(lambda f: _fetch_file(repo, commit, root, f, add), files))
            finally:
                stop.set()
                watcher.join()
                del self.active[repo]
            (root / "refs").mkdir(parents=True, exist_ok=True)
            (root / "refs" / "main").write_text(commit)
            on_progress(progress)
            return root / "snapshots" / commit


def _etag(file: Any) -> str:
    return str(file.lfs.sha256 if file.lfs is not None else file.blob_id)


def _have(root: Path, file: Any) -> int:
    """Bytes of this file already here: whole, or the part a cut-off download left."""
    blob = root / "blobs" / _etag(file)
    if blob.is_file():
        return int(file.size)
    part = blob.with_name(blob.name + ".part")
    return min(part.stat().st_size, int(file.size)) if part.is_file() else 0


def _fetch_file(repo: str, commit: str, root: Path, file: Any, add: Callable[[int], None]) -> None:
    import httpx
    from filelock import FileLock
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils._headers import build_hf_headers

    blob = root / "blobs" / _etag(file)
    blob.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(blob) + ".lock"):
        if not blob.is_file():
            part = blob.with_name(blob.name + ".part")
            start = part.stat().st_size if part.is_file() else 0
            if start > file.size:
                part.unlink()
                start = 0
            headers = build_hf_headers() | ({"Range": f"bytes={start}-"} if start else {})
            url = hf_hub_url(repo, file.path, revision=commit)
            with httpx.stream("GET", url, headers=headers, follow_redirects=True, timeout=60) as response:
                if response.status_code == 200 and start:  # the server sent it whole: start over
                    add(-start)
                    start = 0
                elif response.status_code not in (200, 206):
                    raise RuntimeError(f"{url}: HTTP {response.status_code}")
                with part.open("ab" if start else "wb") as out:
                    for chunk in response.iter_bytes(1 << 20):
                        out.write(chunk)
                        add(len(chunk))
            if part.stat().st_size != file.size:
                raise RuntimeError(f"{file.path}: {part.stat().st_size} of {file.size} bytes arrived")
            os.replace(part, blob)
    link = root / "snapshots" / commit / file.path
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
