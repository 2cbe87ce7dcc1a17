"""Retention: files deleted after the period, job rows kept and marked, orphaned inputs removed,
safe with concurrent sweepers; files and the database are owner-only."""

import base64
import os
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from fluxserve.api.deps import Services
from fluxserve.durations import parse_retention
from fluxserve.retention import sweep
from fluxserve.settings import Settings
from tests.api.test_api import _wait_feed
from tests.conftest import AUTH
from tests.support.images_util import png_bytes


def _job_with_input(client: TestClient) -> dict[str, Any]:
    data_url = "data:image/png;base64," + base64.b64encode(png_bytes((96, 64))).decode()
    body = {"model": "flux-dev", "input": {"prompt": "p", "image": data_url, "prompt_strength": 0.6}}
    job_id = client.post("/vmodel/generate", json=body, headers=AUTH).json()["id"]
    return _wait_feed(client, job_id)


def test_sweep_deletes_files_keeps_the_row_and_answers_410(client: TestClient) -> None:
    services: Services = client.app.state.services  # type: ignore[attr-defined]
    job = _job_with_input(client)
    row = services.store.get_job(job["id"])
    assert row is not None and row.outputs and row.spec.images
    files = [services.storage.open(k) for k in [o.key for o in row.outputs] + list(row.spec.images)]
    assert all(f.is_file() for f in files)
    url = services.storage.url(row.outputs[0].key).removeprefix(services.settings.base_url)
    assert client.get(url).status_code == 200
    assert sweep(services.store, services.storage, 3600, now=time.time() + 60) == (0, 0)  # not yet due
    assert sweep(services.store, services.storage, 3600, now=time.time() + 3700) == (1, 0)
    assert not any(f.exists() for f in files)
    gone = client.get(url)
    assert gone.status_code == 410 and "retention" in gone.json()["error"]["message"]
    kept = services.store.get_job(row.id)
    assert kept is not None and kept.files_expired_at is not None and kept.status.value == "succeeded"
    assert services.store.events(row.id) == []
    assert client.get(f"/vmodel/feed/{row.id}", headers=AUTH).status_code == 200
    # Swept once: a second pass finds nothing.
    assert sweep(services.store, services.storage, 3600, now=time.time() + 3700) == (0, 0)


def test_orphaned_inputs_go_and_referenced_ones_stay(client: TestClient) -> None:
    services: Services = client.app.state.services  # type: ignore[attr-defined]
    job = services.store.get_job(_job_with_input(client)["id"])
    assert job is not None
    kept_folder = services.storage.open(job.spec.images[0]).parent
    orphan = services.storage.open("inputs/0123abcd/0.png")
    services.storage.put("inputs/0123abcd/0.png", b"x")
    old = time.time() - 3 * 86400
    for folder in (kept_folder, orphan.parent):
        os.utime(folder, (old, old))
    # Retention 1 day: the job is recent (its files stay), the orphan is 3 days old.
    assert sweep(services.store, services.storage, 86400) == (0, 1)
    assert not orphan.parent.exists() and kept_folder.is_dir()


def test_concurrent_sweepers_mark_each_job_once(client: TestClient) -> None:
    services: Services = client.app.state.services  # type: ignore[attr-defined]
    for _ in range(6):
        client.post("/v1/images/generations", json={"prompt": "p", "size": "256x256"}, headers=AUTH)
    results: list[tuple[int, int]] = []
    later = time.time() + 7200
    threads = [
        threading.Thread(target=lambda: results.append(sweep(services.store, services.storage, 3600, now=later)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r[0] for r in results) == 6


def test_files_and_database_are_owner_only(client: TestClient, settings: Settings) -> None:
    client.post("/v1/images/generations", json={"prompt": "p", "size": "256x256"}, headers=AUTH)
    db = Path(settings.database.removeprefix("sqlite:///"))
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    outputs = settings.outputs_dir
    assert stat.S_IMODE(outputs.stat().st_mode) == 0o700 == stat.S_IMODE(settings.data_dir.stat().st_mode)
    images = [p for p in outputs.rglob("*") if p.is_file()]
    assert images and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in images)


def test_retention_setting() -> None:
    assert parse_retention("7d") == 7 * 86400 and parse_retention("36h") == 36 * 3600 and parse_retention(0) == 0
    with pytest.raises(ValidationError, match="retention must be a duration"):
        Settings(retention="a week")
