"""The landing folder: the files waiting in ``KEEL_LANDING/<source>/``, each file's version and its days.

A file is known by its path and its version by its ``signature`` (size and mtime): a changed
file is a new version, with run keys of its own. ``file_days`` reads the day partitions a file's
events fall in, or says why the file cannot be ingested at all.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Sequence
from pathlib import Path

from keel.dsl import EventSource
from keel.ingest.file_checks import FileFormatError
from keel.ingest.readers import FORMATS, timestamp_range

Span = Callable[[Path, str], tuple[dt.datetime, dt.datetime] | None]


@dataclasses.dataclass(frozen=True)
class LandingFile:
    """A file listed in the landing folder; no size or mtime when it went away before it was looked at."""

    path: str
    source: EventSource
    size: int | None = None
    mtime_ns: int | None = None

    @classmethod
    def stat(cls, path: Path, source: EventSource) -> LandingFile:
        try:
            stat = path.stat()
        except FileNotFoundError:
            return cls(str(path), source)
        return cls(str(path), source, stat.st_size, stat.st_mtime_ns)

    @property
    def signature(self) -> str:
        return _signature(self.size, self.mtime_ns)


def _signature(size: int | None, mtime_ns: int | None) -> str:
    return f"{size}:{mtime_ns}"


def run_key(path: str, signature: str, attempt: int) -> str:
    """The run key of a file's attempt: the file as it is now, so a changed file is a new run."""
    return f"{path}:{signature}:{attempt}"


def version_prefix(path: Path | str) -> str:
    """What the run keys of the file as it is now start with, whatever the attempt."""
    stat = Path(path).stat()
    return run_key(str(path), _signature(stat.st_size, stat.st_mtime_ns), 0).removesuffix("0")


def landing_files(landing: Path, source: EventSource) -> list[Path]:
    """Files waiting in ``landing/<source>/`` that a reader understands, oldest name first."""
    folder = landing / source.name
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and _known_format(p))


def _known_format(path: Path) -> bool:
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    return bool(suffixes) and suffixes[-1] in FORMATS


def list_landing_folder(landing: Path, sources: Sequence[EventSource]) -> list[LandingFile]:
    """Every file waiting in the landing folder, source by source, as it is now."""
    return [LandingFile.stat(path, source) for source in sources for path in landing_files(landing, source)]


def file_days(
    path: Path, source: EventSource, start: dt.date, today: dt.date, span: Span = timestamp_range
) -> tuple[dt.date, dt.date] | str:
    """The first and last day partition the file's events fall in, or why it cannot be ingested."""
    try:
        found = span(path, source.timestamp)
    except FileFormatError as exc:
        return str(exc)
    if found is None:
        return f"{path}: no parsable {source.timestamp} values"
    first, last = max(found[0].date(), start), min(found[1].date(), today)
    if first > last:
        return f"{path}: events fall outside {start}..{today}"
    return first, last
