"""Entity buckets: Iceberg's ``bucket(N)`` of an entity key for whole arrays, the partition field
that stores it beside ``day(event_ts)``, and reads of one shard of entities that open only its files.

Iceberg's bucket of a value is ``(murmur3_x86_32(bytes) & 0x7FFFFFFF) % N`` with seed 0, the bytes
being a string's UTF-8 or a long's 8 little-endian bytes. ``entity_hash`` computes the part before
``% N`` for a whole Arrow array at once (NumPy, one pass per distinct key length), so a shard of
entities is ``entity_hash % shards == shard`` and agrees with the files' bucket: a file of bucket
``b`` of ``N`` can hold rows of shard ``s`` of ``K`` only when ``b`` and ``s`` agree modulo
``gcd(N, K)``, and when ``K`` divides ``N`` every row of it belongs to shard ``b % K``.

A table written before the partition existed keeps its files (their bucket is unknown, so every
shard reads them and keeps its own rows); files written afterwards carry the bucket.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.exceptions import CommitFailedException
from pyiceberg.expressions import BooleanExpression
from pyiceberg.io.pyarrow import ArrowScan
from pyiceberg.table import FileScanTask, Table
from pyiceberg.transforms import BucketTransform

# Iceberg buckets per raw table: a day's data splits into this many files, so a shard of 1/8 of
# the entities (or fewer) reads 1/8 of the files. More buckets mean more, smaller files per day.
ENTITY_BUCKETS = 8
# An ingest landing a day of at least this many rows adds the bucket partition to its table (once):
# 25,000 rows a file at the least. Below it, a file per (day, bucket) costs more to write, list and
# open than a shard saves by skipping files (the demo's 12 files ingested 2.5x slower bucketed),
# and a shard reads the whole days, keeping its own rows.
BUCKETED_ROWS_PER_DAY = ENTITY_BUCKETS * 25_000

_C1, _C2 = np.uint32(0xCC9E2D51), np.uint32(0x1B873593)


def _rotl(x: np.ndarray, r: int) -> np.ndarray:
    return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def _murmur3(rows: np.ndarray) -> np.ndarray:
    """murmur3_x86_32 (seed 0) of each row of a uint8 matrix (all rows the same length)."""
    n, length = rows.shape
    h = np.zeros(n, np.uint32)
    with np.errstate(over="ignore"):
        for i in range(length // 4):
            k = rows[:, 4 * i : 4 * i + 4].copy().view("<u4").ravel()
            k = _rotl(k * _C1, 15) * _C2
            h = _rotl(h ^ k, 13) * np.uint32(5) + np.uint32(0xE6546B64)
        tail = length % 4
        if tail:
            k = np.zeros(n, np.uint32)
            for j in range(tail - 1, -1, -1):
                k = (k << np.uint32(8)) | rows[:, length - tail + j].astype(np.uint32)
            h ^= _rotl(k * _C1, 15) * _C2
        h ^= np.uint32(length)
        h ^= h >> np.uint32(16)
        h *= np.uint32(0x85EBCA6B)
        h ^= h >> np.uint32(13)
        h *= np.uint32(0xC2B2AE35)
        h ^= h >> np.uint32(16)
    return h


def entity_hash(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Iceberg's bucket hash (before ``% N``) of every value, as int64; -1 where the value is NULL."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks else pa.array([], values.type)
    out = np.full(len(values), -1, np.int64)
    valid = values.is_valid().to_numpy(zero_copy_only=False)
    if pa.types.is_integer(values.type):
        longs = pc.cast(values, pa.int64()).to_numpy(zero_copy_only=False)[valid]
        out[valid] = _murmur3(longs.astype("<i8").view(np.uint8).reshape(-1, 8)) & 0x7FFFFFFF
        return out
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        raise TypeError(f"entity keys of type {values.type} have no bucket hash; declare them string or int64")
    strings = pc.cast(values, pa.large_string())
    offsets = np.frombuffer(strings.buffers()[1], np.int64)[strings.offset : strings.offset + len(strings) + 1]
    data = np.frombuffer(strings.buffers()[2], np.uint8) if strings.buffers()[2] is not None else np.zeros(0, np.uint8)
    starts, lengths = offsets[:-1], np.diff(offsets)
    for length in np.unique(lengths[valid]):
        rows = np.flatnonzero(valid & (lengths == length))
        matrix = data[starts[rows, None] + np.arange(length)] if length else np.zeros((len(rows), 0), np.uint8)
        out[rows] = _murmur3(matrix) & 0x7FFFFFFF
    return out


def shard_of(values: pa.Array | pa.ChunkedArray, shards: int) -> np.ndarray:
    """The shard (0..shards-1) of every entity key; -1 for NULL keys."""
    h = entity_hash(values)
    return np.where(h >= 0, h % shards, -1)


# The partition ------------------------------------------------------------------------------------


def bucket_field(table: Table, spec_id: int | None = None) -> tuple[int, str, int] | None:
    """(position in the partition, source column, number of buckets) of a spec's bucket field, if any."""
    spec = table.specs()[table.spec().spec_id if spec_id is None else spec_id]
    for position, field in enumerate(spec.fields):
        if isinstance(field.transform, BucketTransform):
            return position, table.schema().find_column_name(field.source_id), field.transform.num_buckets
    return None


def ensure_bucket_partition(table: Table, column: str, buckets: int = ENTITY_BUCKETS) -> Table:
    """Add ``bucket(buckets, column)`` to the table's partition spec unless it has one.

    A partition-spec evolution: files already written keep their spec and stay readable.
    Another writer evolving the same table first is fine: the spec is checked again.
    """
    for _ in range(3):
        if bucket_field(table) is not None:
            return table
        try:
            with table.update_spec() as spec:
                spec.add_field(column, BucketTransform(buckets), f"{column}_bucket")
        except CommitFailedException:
            pass
        table = table.refresh()
    return table


# Reading one shard --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """The files a scan would open, and how many rows and bytes they hold."""

    tasks: list[FileScanTask]
    rows: int
    bytes: int


def plan(scan) -> Plan:
    tasks = list(scan.plan_files())
    return Plan(tasks, sum(t.file.record_count for t in tasks), sum(t.file.file_size_in_bytes for t in tasks))


def shard_tasks(table: Table, tasks: Iterable[FileScanTask], shard: int, shards: int) -> tuple[list, bool]:
    """The files that can hold rows of ``shard``, and whether their rows must still be filtered by key."""
    keep, exact = [], True
    for task in tasks:
        field = bucket_field(table, task.file.spec_id)
        bucket = task.file.partition[field[0]] if field else None
        if bucket is None:
            keep.append(task)
            exact = False
            continue
        common = math.gcd(field[2], shards)
        if bucket % common == shard % common:
            keep.append(task)
            exact = exact and shards == common
    return keep, exact


def read_shard(table: Table, scan, row_filter: BooleanExpression, column: str, shard: int, shards: int) -> pa.Table:
    """The rows of a planned scan whose ``column`` falls in ``shard`` of ``shards``, opening only the
    files that can hold them."""
    tasks, exact = shard_tasks(table, scan.plan_files(), shard, shards)
    data = ArrowScan(scan.table_metadata, scan.io, scan.projection(), row_filter, scan.case_sensitive).to_table(tasks)
    if shards == 1 or exact:
        return data
    return data.filter(pa.array(shard_of(data.column(column), shards) == shard))
