"""One way to wait in tests: poll a condition until it holds or a deadline passes, then say what was last seen."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(probe: Callable[[], T], done: Callable[[T], bool], *, timeout: float = 60, interval: float = 0.1) -> T:
    """Call ``probe`` until ``done(result)``; fail with the last result after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if done(result):
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not done after {timeout}s; last seen: {result!r}"[:3000])
        time.sleep(interval)
