"""When to ask a provider about a task again: near when its tasks of that model have been taking, then
backing off. A task that takes 3 s is not polled thirty times at 0.1 s, nor found done 0.9 s late at a
fixed 1 s; a provider's webhook (where it sends one) still wakes the poll at once."""

from __future__ import annotations

import threading

BACKOFF = 1.5  # each unanswered poll waits this much longer than the one before
CAP_S = 10.0  # the longest wait between two polls
EARLY = 0.8  # the second poll comes at this share of the typical duration (some tasks end early)
WEIGHT = 0.3  # the last duration's weight in the running typical one


class Pacing:
    def __init__(self, interval_s: float) -> None:
        self._interval = interval_s
        self._cap = max(CAP_S, interval_s)
        self._typical: dict[str, float] = {}
        self._lock = threading.Lock()

    def wait_s(self, model: str, polls: int, elapsed_s: float, errors: int) -> float:
        """Seconds before the next poll, after ``polls`` unanswered ones, ``elapsed_s`` into the task."""
        with self._lock:
            typical = self._typical.get(model)
        if polls == 1 and typical is not None and EARLY * typical - elapsed_s > self._interval:
            return min(self._cap, EARLY * typical - elapsed_s)
        backoff = self._interval * BACKOFF ** max(0, polls - 1) * (2 if errors else 1)
        return min(self._cap, backoff)

    def took(self, model: str, seconds: float) -> None:
        """A task of this model was found done ``seconds`` after it was submitted."""
        with self._lock:
            old = self._typical.get(model)
            self._typical[model] = seconds if old is None else (1 - WEIGHT) * old + WEIGHT * seconds

    def typical_s(self, model: str) -> float | None:
        with self._lock:
            return self._typical.get(model)
