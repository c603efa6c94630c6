"""Time in tests without depending on the machine's speed: polling with a deadline, and an
injected clock and sleep that record the waits."""

import time


def wait_for(predicate, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class Waits:
    """An injected sleep that records the waits, and a clock they advance."""

    def __init__(self):
        self.waits: list[float] = []
        self.now = 0.0

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now
