"""Where the entity shards of training sets and backfills run: in this process, or on a Dask cluster.

``Compute(None)`` runs tasks here, one after another (the embedded default: one shard in memory
at a time). ``Compute("tcp://scheduler:8786")`` submits them to a Dask distributed scheduler;
its workers import the same project, read the lakehouse themselves and send their shard's result
straight back (``direct_to_workers``), so nothing large passes through the scheduler. A worker
that dies mid-task loses nothing: the scheduler gives its tasks to another worker (Dask's
``allowed-failures``), and a task is a pure computation whose result only the caller writes.

Every task is measured where it runs: wall time, and the peak resident memory of its process
while it ran (Linux resets the peak through ``/proc/self/clear_refs`` before each task; other
systems report the process's peak so far).
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

IN_PROCESS = "in-process"


@dataclass(frozen=True)
class TaskStats:
    """One task: its label, the worker that finished it, seconds, and its process's peak RSS in bytes."""

    label: str
    worker: str
    seconds: float
    peak_rss: int


@dataclass
class ShardReport:
    """How a sharded computation ran: shards, and each task's statistics."""

    shards: int
    engine: str = IN_PROCESS
    tasks: list[TaskStats] = field(default_factory=list)

    @property
    def workers(self) -> list[str]:
        return sorted({t.worker for t in self.tasks})

    @property
    def peak_rss(self) -> int:
        return max((t.peak_rss for t in self.tasks), default=0)

    def summary(self) -> str:
        if not self.tasks:
            return f"{self.shards} shard(s), no task ran (no entities)"
        slowest = max(self.tasks, key=lambda t: t.seconds)
        return (
            f"{self.shards} shard(s) on {self.engine}, {len(self.tasks)} task(s) on {len(self.workers)} worker(s); "
            f"peak memory {self.peak_rss / 2**20:.0f} MiB; slowest {slowest.label} {slowest.seconds:.2f} s"
        )


def machine_memory() -> int:
    """Physical memory of this machine in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def reset_peak() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if platform.system() == "Darwin" else peak * 1024


def measured(fn: Callable, label: str, args: tuple) -> tuple[object, TaskStats]:
    """Run ``fn(*args)`` and say how long it took and how much memory its process peaked at."""
    try:
        from distributed import get_worker

        worker = get_worker().address
    except (ImportError, ValueError):
        worker = IN_PROCESS
    reset_peak()
    start = time.perf_counter()
    result = fn(*args)
    return result, TaskStats(label, worker, time.perf_counter() - start, peak_rss())


class Compute:
    """Runs labelled tasks in this process or on the Dask scheduler at ``address``."""

    def __init__(self, address: str | None = None, *, connect_timeout: float = 30.0) -> None:
        self.address = address
        self.connect_timeout = connect_timeout

    @property
    def engine(self) -> str:
        return self.address or IN_PROCESS

    def map(self, fn: Callable, tasks: Sequence[tuple[str, tuple]]) -> tuple[list, list[TaskStats]]:
        """``fn(*args)`` for each ``(label, args)``: results in task order, and each task's statistics.

        On a cluster ``fn`` and ``args`` travel by pickle: give a module-level function and small
        arguments (where to read, not what was read)."""
        if self.address is None:
            done = [measured(fn, label, args) for label, args in tasks]
        else:
            client = _client(self.address, self.connect_timeout)
            futures = [
                client.submit(measured, fn, label, args, key=f"keel-{label}-{os.urandom(6).hex()}", pure=False)
                for label, args in tasks
            ]
            done = client.gather(futures)
        return [result for result, _ in done], [stats for _, stats in done]


_clients: dict = {}


def _client(address: str, timeout: float):
    """One client per scheduler per process, connected on first use."""
    from distributed import Client

    client = _clients.get(address)
    if client is None or client.status not in ("running", "connecting"):
        try:
            client = Client(address, set_as_default=False, direct_to_workers=True, timeout=timeout)
        except OSError as exc:
            raise ComputeError(
                f"KEEL_COMPUTE={address!r}: no Dask scheduler answers there ({exc}); start one "
                "(dask scheduler) with workers, or unset KEEL_COMPUTE to run shards in this process"
            ) from None
        _clients[address] = client
    return client


def disconnect(address: str) -> None:
    """Close this process's client of the scheduler at ``address`` (before the scheduler stops)."""
    client = _clients.pop(address, None)
    if client is not None:
        client.close()


class ComputeError(RuntimeError):
    """The configured compute engine cannot be reached; the message says what to do."""
