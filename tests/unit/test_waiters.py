"""A synchronous call waits for the end of its job, woken when it may have ended, not at every step (each
wake-up is a loop wake and a store read); watchers that follow every change (SSE, Prefer: wait with
progress) still see each one."""

from __future__ import annotations

import asyncio
import threading

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
