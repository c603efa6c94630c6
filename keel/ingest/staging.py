"""Ingest staging folders: made per ingest under ``KEEL_HOME/staging``, and removed when a killed ingest left one.

An ingest validates its files into a DuckDB database in its own folder
``<root>/keel-ingest-<source>-<pid>-<random>``, with a record of the process that owns it
(pid, host, process start time). The ingest removes the folder when it ends, so a folder
left is a killed run's; ``clean_staging`` (``keel maintain`` and the maintenance asset)
removes those and says how many bytes that freed.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from keel.dsl import EventSource

STAGING_PREFIX = "keel-ingest-"
OWNER_FILE = "owner.json"


def make_workdir(source: EventSource, staging_root: Path | None) -> Path:
    """A fresh staging folder under ``staging_root``, with a record of the process that owns it."""
    if staging_root is not None:
        Path(staging_root).mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{source.name}-{os.getpid()}-", dir=staging_root))
    owner = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "process_start": process_start(os.getpid()),
        "created_at": dt.datetime.now(dt.UTC).isoformat(),
    }
    try:
        (workdir / OWNER_FILE).write_text(json.dumps(owner))
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return workdir


def process_start(pid: int) -> str | None:
    """When process ``pid`` started, in clock ticks since boot (Linux), so a reused pid is told apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the command name, which is in parentheses and may hold spaces: state is the 3rd
    # field of the line, starttime the 22nd.
    return stat.rsplit(")", 1)[1].split()[19]


@dataclass
class StagingCleanup:
    """What ``clean_staging`` did: the folders it removed, the bytes they held, the folders it kept."""

    root: Path
    removed: list[str] = field(default_factory=list)
    bytes_freed: int = 0
    kept: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"staging {self.root}: removed {len(self.removed)} folder(s) left by killed ingests, "
            f"freed {self.bytes_freed:,} bytes; kept {len(self.kept)} of running ingests"
        )


def clean_staging(
    root: Path, *, max_age: dt.timedelta = dt.timedelta(hours=24), now: float | None = None
) -> StagingCleanup:
    """Remove the staging folders under ``root`` whose ingest is gone.

    An ingest removes its folder when it ends, so a folder left is a killed run's. A folder made
    on this host goes as soon as its owning process has (a pid reused by another process does not
    count: the process start time must match). The processes of another host sharing KEEL_HOME
    cannot be seen, so a folder made there, or one without an owner record, goes once nothing in
    it has changed for ``max_age``: a running ingest writes its staging database batch by batch.
    """
    if max_age <= dt.timedelta(0):
        raise ValueError(f"staging max_age {max_age} must be positive (e.g. 24 hours)")
    result = StagingCleanup(Path(root))
    if not result.root.is_dir():
        return result
    now = time.time() if now is None else now
    for folder in sorted(result.root.iterdir()):
        if not folder.name.startswith(STAGING_PREFIX) or not folder.is_dir():
            continue
        size, changed = _size_and_last_change(folder)
        if _owner_alive(folder, changed, now - max_age.total_seconds()):
            result.kept.append(folder.name)
            continue
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            result.removed.append(folder.name)
            result.bytes_freed += size
    return result


def _owner_alive(folder: Path, changed: float, stale_before: float) -> bool:
    try:
        owner = json.loads((folder / OWNER_FILE).read_text())
        pid, host = int(owner["pid"]), str(owner["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return changed >= stale_before
    if host != socket.gethostname():
        return changed >= stale_before
    if not _process_exists(pid):
        return False
    started = owner.get("process_start")
    return started is None or process_start(pid) in (None, started)


def _process_exists(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    if Path("/proc/self/stat").exists():
        try:
            # A killed process its parent has not reaped yet is a zombie (state Z): gone all the same.
            return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _size_and_last_change(folder: Path) -> tuple[int, float]:
    size, changed = 0, folder.stat().st_mtime
    for path in folder.rglob("*"):
        try:
            info = path.stat()
        except OSError:
            continue
        changed = max(changed, info.st_mtime)
        if path.is_file():
            size += info.st_size
    return size, changed
