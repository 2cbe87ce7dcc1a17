"""A synchronous call waits for the end of its job, woken when it may have ended, not at every step (each
wake-up is a loop wake and a store read); watchers that follow every change (SSE, Prefer: wait with
progress) still see each one."""

from __future__ import annotations

import asyncio
import threading

from fluxserve.waiters import Waiters


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
