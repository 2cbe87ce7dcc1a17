from pathlib import Path

import pytest

from fluxserve.auth import Authenticator, create_key
from fluxserve.errors import Unauthorized
from fluxserve.jobs import Job, Output, Status, new_job_id
from fluxserve.models import ModelRegistry
from fluxserve.store import Store


def _job(owner: str = "o", created: float | None = None) -> Job:
    spec = ModelRegistry.default().get("flux").make_spec(prompt="p", width=256, height=256, seed=1)
    kwargs = {} if created is None else {"created_at": created}
    return Job(id=new_job_id(), owner=owner, dialect="vmodel", spec=spec, request={"x": 1}, **kwargs)


def test_job_round_trip_and_claim_order(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    a, b = _job(created=1.0), _job(created=2.0)
    store.insert_job(b)
    store.insert_job(a)
    assert store.queue_depth() == 2
    assert store.queue_position(a) == 1 and store.queue_position(b) == 2
    claimed = store.claim_next()
    assert claimed is not None and claimed.id == a.id
    assert claimed.status is Status.PROCESSING and claimed.attempts == 1
    store.update_progress(a.id, 2, 4)
    store.finish(a.id, Status.SUCCEEDED, outputs=[Output(f"{a.id}/out-0.png", 1, 256, 256, "png")])
    got = store.get_job(a.id)
    assert got is not None and got.status is Status.SUCCEEDED and got.progress_done == 2
    assert got.outputs[0].seed == 1 and got.request == {"x": 1} and got.spec == a.spec
    assert store.get_job("nope") is None


def test_recover_interrupted_requeues_then_fails(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    job = _job()
    store.insert_job(job)
    store.claim_next()
    assert store.recover_interrupted(max_attempts=2) == (1, 0)
    assert store.get_job(job.id).status is Status.QUEUED  # type: ignore[union-attr]
    store.claim_next()
    assert store.recover_interrupted(max_attempts=2) == (0, 1)
    failed = store.get_job(job.id)
    assert failed is not None and failed.status is Status.FAILED and "2 times" in (failed.error or "")


def test_clean_requeue_does_not_count_an_attempt(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    job = _job()
    store.insert_job(job)
    store.claim_next()
    store.requeue(job.id)
    again = store.claim_next()
    assert again is not None and again.attempts == 1


def test_cancel_of_queued_job_is_immediate(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    job = _job()
    store.insert_job(job)
    store.request_cancel(job.id)
    assert store.get_job(job.id).status is Status.CANCELED  # type: ignore[union-attr]
    assert store.claim_next() is None


def test_keys_are_hashed_and_revocable(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    new = create_key(store, "ci")
    rows = store.list_keys()
    assert len(rows) == 1 and new.key not in str(tuple(rows[0]))
    auth = Authenticator(store, env_key="env-secret")
    assert auth.owner_for(new.key) == new.id
    assert auth.owner_for("env-secret").startswith("env_")
    for bad in [None, "", "wrong", new.key + "x"]:
        with pytest.raises(Unauthorized):
            auth.owner_for(bad)
    assert store.revoke_key("ci") == 1
    with pytest.raises(Unauthorized):
        auth.owner_for(new.key)
