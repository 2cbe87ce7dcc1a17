"""An upstream's health: consecutive failures mark it unhealthy, and it is skipped for a cool-down."""

from __future__ import annotations

import threading
import time
from typing import Any


class Health:
    def __init__(self, unhealthy_after: int, cooldown_s: float) -> None:
        self._after = unhealthy_after
        self._cooldown_s = cooldown_s
        self._failures = 0
        self._until = 0.0
        self._lock = threading.Lock()
        self.last_error: str | None = None

    def failed(self, error: str | None = None) -> None:
        with self._lock:
            self._failures += 1
            self.last_error = error or self.last_error
            if self._failures >= self._after:
                self._until = time.monotonic() + self._cooldown_s

    def trip(self, error: str) -> None:
        """Unhealthy now, for the cool-down: a failure no retry can mend (credentials, credit, a wrong model)."""
        with self._lock:
            self._failures = max(self._failures + 1, self._after)
            self.last_error = error
            self._until = time.monotonic() + self._cooldown_s

    def succeeded(self) -> None:
        with self._lock:
            self._failures = 0
            self._until = 0.0

    @property
    def healthy(self) -> bool:
        return time.monotonic() >= self._until

    def usable(self) -> bool:
        """Not cooling down; once the cool-down passes, the next job is the probe."""
        return self.healthy

    def view(self) -> dict[str, Any]:
        return {"healthy": self.healthy, "consecutive_failures": self._failures}
