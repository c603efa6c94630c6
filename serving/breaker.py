"""A circuit breaker for the online store: after ``failures`` failed reads in a row it opens,
and reads are skipped (the model's defaults answer, marked degraded) for ``reset_s``; then
one trial read decides whether it closes again."""

from __future__ import annotations

import threading
import time

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class CircuitBreaker:
    def __init__(self, failures: int = 5, reset_s: float = 5.0, clock=time.monotonic) -> None:
        if failures < 1 or reset_s <= 0:
            raise ValueError(f"circuit breaker: failures={failures} must be >= 1 and reset_s={reset_s} > 0")
        self.failures = failures
        self.reset_s = reset_s
        self._clock = clock
        self._lock = threading.Lock()
        self._failed = 0
        self._opened_at: float | None = None
        self._trial = False
        self.opened = 0  # times it opened, for metrics

    @property
    def state(self) -> str:
        if self._opened_at is None:
            return CLOSED
        return HALF_OPEN if self._clock() - self._opened_at >= self.reset_s else OPEN

    def allow(self) -> bool:
        """Whether a read may be tried now (closed, or the one trial of a half-open breaker)."""
        with self._lock:
            if self._opened_at is None:
                return True
            if self._clock() - self._opened_at >= self.reset_s and not self._trial:
                self._trial = True
                return True
            return False

    def success(self) -> None:
        with self._lock:
            self._failed, self._opened_at, self._trial = 0, None, False

    def failure(self) -> None:
        with self._lock:
            self._failed += 1
            if self._trial or (self._opened_at is None and self._failed >= self.failures):
                self.opened += self._opened_at is None
                self._opened_at, self._trial = self._clock(), False
