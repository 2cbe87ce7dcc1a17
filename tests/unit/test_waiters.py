"""A synchronous call waits for the end of its job, woken when it may have ended, not at every step (each
wake-up is a loop wake and a store read); watchers that follow every change (SSE, Prefer: wait with
progress) still see each one."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from fluxserve.errors import NotFound
from fluxserve.job import Job, Output, Status
from fluxserve.jobs import JobService
from fluxserve.migrations import open_store
from fluxserve.spec import GenerationSpec
from fluxserve.waiters import ENDED_KEPT, Waiters


def test_a_final_only_waiter_sleeps_through_steps_and_wakes_at_the_end() -> None:
    waiters = Waiters()

    async def main() -> tuple[bool, bool, bool, bool]:
        with waiters.waiting("j", final_only=True) as final, waiters.waiting("j") as every:
            step = threading.Thread(target=waiters.wake, args=("j",), kwargs={"final": False})
            step.start()
            step.join()
            await asyncio.sleep(0.05)
            after_step = (final.is_set(), every.is_set())
            every.clear()
            end = threading.Thread(target=waiters.wake, args=("j",))  # final by default: NOTIFY from other nodes
            end.start()
            end.join()
            await asyncio.wait_for(final.wait(), 2)
            await asyncio.wait_for(every.wait(), 2)
            return (*after_step, final.is_set(), every.is_set())

    assert asyncio.run(main()) == (False, True, True, True)


def test_an_end_before_anyone_waits_wakes_the_next_waiter_at_once() -> None:
    """A synchronous call registers after its create returns: a job that ended in between (a fast upstream)
    wakes it at once, not at its next poll. Steps are not remembered; the memory is bounded."""
    waiters = Waiters()

    async def main() -> tuple[bool, bool, bool]:
        waiters.wake("step", final=False)
        waiters.wake("ended")
        with waiters.waiting("step", final_only=True) as step, waiters.waiting("ended", final_only=True) as ended:
            first = (step.is_set(), ended.is_set())
        with waiters.waiting("ended", final_only=True) as again:  # told once: the next waiter reads as usual
            return (*first, again.is_set())

    assert asyncio.run(main()) == (False, True, False)
    for i in range(ENDED_KEPT + 10):
        waiters.wake(f"j{i}")
    assert len(waiters._ended) == ENDED_KEPT and "j0" not in waiters._ended


def test_a_final_wake_hands_the_ended_job_to_end_waiters_and_steps_hand_nothing() -> None:
    waiters = Waiters()

    async def main() -> tuple[object, object]:
        with waiters.waiting("j", final_only=True) as final, waiters.waiting("j") as every:
            waiters.wake("j", final=False)
            await asyncio.wait_for(every.wait(), 2)
            after_step = every.ended
            every.clear()
            threading.Thread(target=waiters.wake, args=("j",), kwargs={"ended": "the job"}).start()
            await asyncio.wait_for(final.wait(), 2)
            return after_step, final.ended

    assert asyncio.run(main()) == (None, "the job")


def test_a_synchronous_wait_answers_from_the_written_end_without_reading_the_row(tmp_path: Path) -> None:
    """The completion's own row (RETURNING) reaches the waiting call: no read of the row just written. Another
    owner's wait is not answered from it (it reads, and is told there is no such job)."""
    store = open_store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    jobs = JobService(store, lease_s=5.0)
    reads: list[str] = []
    real = store.get_job

    def counted(job_id: str, **kw: Any) -> Any:
        reads.append(job_id)
        return real(job_id, **kw)

    store.get_job = counted  # type: ignore[method-assign]
    try:
        spec = GenerationSpec(
            prompt="x", model="flux-demo", width=64, height=64, num_images=1, steps=2, guidance=3.5, seed=1
        )
        job = jobs.submit_sync("o", "openai", spec, {})

        async def main() -> Job:
            waiting = asyncio.ensure_future(jobs.wait(job.id, "o", timeout=10, seen=job))
            await asyncio.sleep(0.05)
            claimed = await asyncio.to_thread(jobs.claim_id, job.id, "w")
            assert claimed is not None
            await asyncio.to_thread(jobs.complete, claimed, [Output(f"{job.id}/out-0.png", 1, 64, 64, "png")])
            return await waiting

        done = asyncio.run(main())
        assert done.status is Status.SUCCEEDED and done.outputs[0].key == f"{job.id}/out-0.png"
        assert reads == []
        with pytest.raises(NotFound):
            asyncio.run(jobs.wait(job.id, "someone else", timeout=1))
        assert reads == [job.id]
    finally:
        jobs.close()
        store.close()
