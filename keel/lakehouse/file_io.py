"""Iceberg's metadata files, read once per process from object storage.

An Iceberg table's metadata files are written once and never changed: each commit writes a new
``*.metadata.json`` and new manifest lists and manifests (``*.avro``) under new names. pyiceberg
reads them again on every load (an object store's HEAD and GET each), and an ingest or a
backfill loads a table many times: on S3 most of a run's requests were these re-reads.
``MetadataCachingFileIO`` (pyiceberg's ``py-io-impl``, set by ``open_catalog`` for object
stores) keeps such files' bytes in a bounded in-process cache; data files and every write go
through pyarrow as before.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import pyarrow as pa
from pyiceberg.io import InputFile, InputStream
from pyiceberg.io.pyarrow import PyArrowFileIO

IMMUTABLE_SUFFIXES = (".metadata.json", ".avro")
CACHE_BYTES = 64 * 1024 * 1024


class BoundedCache:
    """Bytes by location, least recently used dropped first beyond ``limit`` bytes; thread-safe."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, location: str) -> bytes | None:
        with self._lock:
            data = self._items.get(location)
            if data is not None:
                self._items.move_to_end(location)
            return data

    def put(self, location: str, data: bytes) -> None:
        if len(data) > self.limit:
            return
        with self._lock:
            if location not in self._items:
                self._items[location] = data
                self.size += len(data)
            while self.size > self.limit:
                _, dropped = self._items.popitem(last=False)
                self.size -= len(dropped)


# One per process: every catalog and table of the process shares what was read.
CACHE = BoundedCache(CACHE_BYTES)


class _CachedInput(InputFile):
    """An immutable metadata file: read whole on first use, from memory after."""

    def __init__(self, location: str, source: InputFile) -> None:
        super().__init__(location)
        self._source = source

    def _bytes(self) -> bytes:
        data = CACHE.get(self.location)
        if data is None:
            with self._source.open() as stream:
                data = stream.read()
            CACHE.put(self.location, data)
        return data

    def __len__(self) -> int:
        return len(self._bytes())

    def exists(self) -> bool:
        return CACHE.get(self.location) is not None or self._source.exists()

    def open(self, seekable: bool = True) -> InputStream:
        return pa.BufferReader(self._bytes())


class MetadataCachingFileIO(PyArrowFileIO):
    """pyiceberg's pyarrow FileIO, reading table metadata, manifest lists and manifests from
    ``CACHE`` once read; everything else as ``PyArrowFileIO``."""

    def new_input(self, location: str) -> InputFile:
        source = super().new_input(location)
        return _CachedInput(location, source) if location.endswith(IMMUTABLE_SUFFIXES) else source
