"""Deleting images, inputs and previews after FLUXSERVE_RETENTION; the job rows stay, marked expired.

Safe with several nodes: file deletes are idempotent and each job is marked once by a conditional
update, so nodes sweeping at the same time at worst delete the same file twice. Input folders
that no kept job names (a request refused after its images were stored) are removed once they are
older than the retention period plus an hour.
"""

from __future__ import annotations

import logging
import re
import threading
import time

from .storage import Storage
from .store import Store

log = logging.getLogger(__name__)

ORPHAN_GRACE_S = 3600.0


def sweep(
    store: Store, storage: Storage, retention_s: float, now: float | None = None, limit: int = 200
) -> tuple[int, int]:
    """One pass: (jobs whose files were deleted, orphaned input folders removed). ``retention_s`` 0 keeps
    files forever, but for jobs that asked for less (fal's lifecycle preference)."""
    now = time.time() if now is None else now
    expired = 0
    for job in store.expirable(now, retention_s if retention_s > 0 else None, limit):
        keys = [o.key for o in job.outputs] + list(job.previews) + list(job.spec.images)
        if job.spec.mask:
            keys.append(job.spec.mask)
        for key in keys:
            storage.delete(key)
        expired += store.mark_files_expired(job.id, now)
    if retention_s <= 0:
        return expired, 0
    for upload in store.expired_files(now - retention_s, limit):  # Replicate files: their row, then bytes
        if store.delete_file(upload.owner, upload.id) is not None:
            storage.delete(upload.key)
    orphans = 0
    for folder in storage.stale_input_folders(now - retention_s - ORPHAN_GRACE_S):
        if re.fullmatch(r"inputs/[0-9a-f]+", folder) and not store.references_input(folder):
            storage.delete_folder(folder)
            orphans += 1
    return expired, orphans


class RetentionSweeper:
    """A daemon thread per node sweeping every ``interval_s``; errors are logged and retried next time."""

    def __init__(self, store: Store, storage: Storage, retention_s: float, interval_s: float = 60.0) -> None:
        self._store, self._storage = store, storage
        self._retention_s, self._interval_s = retention_s, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fluxserve-retention", daemon=True)

    def start(self) -> None:
        self._thread.start()  # with retention 0 too: a job may ask for its files to go sooner

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                expired, orphans = sweep(self._store, self._storage, self._retention_s)
            except Exception:  # a locked database, a full disk: the next pass tries again
                log.exception("retention sweep failed")
                continue
            if expired or orphans:
                log.info("retention: deleted the files of %d jobs and %d orphaned input folders", expired, orphans)
