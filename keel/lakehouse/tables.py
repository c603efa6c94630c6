"""The lakehouse: Iceberg tables through pyiceberg, read into Arrow for DuckDB.

Tables holding events are partitioned by the day of their event timestamp. Every write is
stamped with snapshot properties (run id, partition, code version, source) so any row can
be traced to the run and code that wrote it. Reads can travel to an older snapshot or
moment; columns can be added without breaking older snapshots; maintenance expires old
snapshots and compacts small files.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.catalog import Catalog
from pyiceberg.exceptions import (
    CommitFailedException,
    NamespaceAlreadyExistsError,
    NoSuchTableError,
    TableAlreadyExistsError,
    ValidationException,
)
from pyiceberg.expressions import AlwaysFalse, And, BooleanExpression, GreaterThanOrEqual, LessThan, Or
from pyiceberg.table import Table
from pyiceberg.table.refs import SnapshotRefType
from pyiceberg.transforms import BucketTransform, DayTransform, IdentityTransform, MonthTransform
from sqlalchemy.exc import InterfaceError, OperationalError

from keel.config import Settings, s3_region
from keel.lakehouse.buckets import ENTITY_BUCKETS, ensure_bucket_partition

PROP_RUN_ID = "keel.run_id"
PROP_PARTITION = "keel.partition"
PROP_CODE_VERSION = "keel.code_version"
PROP_SOURCE = "keel.source"
PROP_BASE_SNAPSHOT = "keel.base_snapshot"
DAY = dt.timedelta(days=1)


class LakehouseError(RuntimeError):
    """A lakehouse operation cannot go ahead; the message says why and what to do."""


@dataclass(frozen=True)
class SnapshotInfo:
    snapshot_id: int
    parent_id: int | None
    committed_at: dt.datetime
    operation: str
    properties: dict[str, str]


def day_filter(column: str, days: Iterable[dt.date]) -> BooleanExpression:
    """An Iceberg filter selecting whole days of ``column``, one range per run of consecutive days."""
    ordered = sorted(set(days))
    if not ordered:
        return AlwaysFalse()
    ranges: list[tuple[dt.date, dt.date]] = []
    for day in ordered:
        if ranges and ranges[-1][1] == day:
            ranges[-1] = (ranges[-1][0], day + DAY)
        else:
            ranges.append((day, day + DAY))
    exprs = [And(GreaterThanOrEqual(column, _iso(start)), LessThan(column, _iso(end))) for start, end in ranges]
    out = exprs[0]
    for expr in exprs[1:]:
        out = Or(out, expr)
    return out


def partition_label(days: Sequence[dt.date]) -> str:
    """How a set of day partitions is written in snapshot properties and run tags."""
    ordered = sorted(set(days))
    if not ordered:
        return ""
    if len(ordered) == 1:
        return ordered[0].isoformat()
    if (ordered[-1] - ordered[0]).days + 1 == len(ordered):
        return f"{ordered[0].isoformat()}..{ordered[-1].isoformat()}"
    return ",".join(d.isoformat() for d in ordered)


def days_of(data: pa.Table, column: str) -> list[dt.date]:
    """The distinct UTC days of a timestamp column."""
    if data.num_rows == 0:
        return []
    days = pc.unique(pc.cast(data.column(column), pa.timestamp("us", tz="UTC")).cast(pa.date32()))
    return sorted(d for d in days.to_pylist() if d is not None)


def replace_rows(
    table: Table, data: pa.Table, where: BooleanExpression, properties: dict[str, str], branch: str = "main"
) -> None:
    """Replace the rows matching ``where`` with ``data`` in one snapshot on ``branch``.

    pyiceberg warns when ``where`` matches no rows yet; for a first write that is expected.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Delete operation did not match any records", category=UserWarning)
        table.overwrite(data, overwrite_filter=where, snapshot_properties=properties, branch=branch)


# Writers that replace their own rows straight on main of a shared table (keel.quarantine,
# monitoring results) commit again when another writer committed first.
COMMIT_ATTEMPTS = 8


def _iso(day: dt.date) -> str:
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).isoformat()


class Lakehouse:
    """Iceberg tables in one catalog, stamped with the code version that writes them."""

    def __init__(self, catalog: Catalog, code_version: str = "unknown") -> None:
        self.catalog = catalog
        self.code_version = code_version

    @classmethod
    def from_settings(cls, settings: Settings) -> Lakehouse:
        return cls(open_catalog(settings), settings.code_version)

    @classmethod
    def from_env(cls) -> Lakehouse:
        return cls.from_settings(Settings.from_env())

    # tables

    def ensure_table(
        self,
        name: str,
        schema: pa.Schema,
        *,
        day_column: str | None = None,
        identity_column: str | None = None,
        month_column: str | None = None,
        bucket_column: str | None = None,
        properties: dict[str, str] | None = None,
    ) -> Table:
        """Create the table, or evolve an existing one by adding the columns (and bucket partition) it lacks.
        ``month_column`` partitions by month (tables with few rows a day); ``bucket_column`` adds
        ``bucket(entity key)`` (``keel.lakehouse.buckets``), so a shard of entities reads its files only."""
        namespace = name.split(".")[0]
        with contextlib.suppress(NamespaceAlreadyExistsError):
            self.catalog.create_namespace(namespace)
        try:
            table = self.catalog.load_table(name)
        except NoSuchTableError:
            try:
                table = self.catalog.create_table(name, schema=schema, properties=properties or {})
            except TableAlreadyExistsError:  # another process (a second stream worker) created it first
                parts = {"day_column": day_column, "identity_column": identity_column, "month_column": month_column}
                return self.ensure_table(name, schema, **parts, bucket_column=bucket_column, properties=properties)
            with table.update_spec() as spec:
                if day_column:
                    spec.add_field(day_column, DayTransform(), f"{day_column}_day")
                if month_column:
                    spec.add_field(month_column, MonthTransform(), f"{month_column}_month")
                if identity_column:
                    spec.add_field(identity_column, IdentityTransform(), identity_column)
                if bucket_column:
                    spec.add_field(bucket_column, BucketTransform(ENTITY_BUCKETS), f"{bucket_column}_bucket")
            # Branches can only be cut from a snapshot, so a new table starts with an empty one.
            table.append(schema.empty_table(), snapshot_properties=self.snapshot_properties("create", [], "create"))
            return table
        missing = [f.name for f in schema if f.name not in table.schema().column_names]
        if missing:
            for field in schema:
                if field.name in missing and not field.nullable:
                    raise LakehouseError(
                        f"table {name!r}: new column {field.name!r} is required (NOT NULL), but rows "
                        "already written have no value for it; declare it nullable to add it"
                    )
            with table.update_schema() as update:
                update.union_by_name(schema)
            table = self.catalog.load_table(name)
        return ensure_bucket_partition(table, bucket_column) if bucket_column else table

    def table(self, name: str) -> Table:
        try:
            return self.catalog.load_table(name)
        except NoSuchTableError:
            raise LakehouseError(
                f"table {name!r} does not exist yet (ingest data into it first, e.g. "
                f"'keel ingest FILE --source {name.split('.')[-1]}')"
            ) from None

    def exists(self, name: str) -> bool:
        return self.catalog.table_exists(name)

    def tables(self) -> list[str]:
        names = []
        for ns in self.catalog.list_namespaces():
            names += [".".join(ident) for ident in self.catalog.list_tables(ns)]
        return sorted(names)

    def replace_on_main(self, name: str, data: pa.Table, where: BooleanExpression, properties: dict[str, str]) -> None:
        """``replace_rows`` on main, again on the table's new head when another writer committed first.

        For a writer whose ``where`` covers only its own rows (a source's files in the
        quarantine, a model's windows in monitoring.drift) the retry is exact: nobody else's
        rows are touched, and this writer's are replaced whole.
        """
        for attempt in range(1, COMMIT_ATTEMPTS + 1):
            try:
                replace_rows(self.table(name), data, where, properties)
                return
            except (CommitFailedException, ValidationException):  # pyiceberg's own retry may find "conflicts"
                if attempt == COMMIT_ATTEMPTS:
                    raise
                time.sleep(min(0.05 * attempt, 0.5))

    def head(self, name: str, branch: str = "main") -> int | None:
        """The snapshot id at the head of a branch (None for a table with no data yet)."""
        ref = self.table(name).refs().get(branch)
        return ref.snapshot_id if ref else None

    # reads

    def read(
        self,
        name: str,
        *,
        snapshot_id: int | None = None,
        as_of: dt.datetime | None = None,
        branch: str | None = None,
        row_filter: BooleanExpression | str | None = None,
        columns: Sequence[str] | None = None,
        limit: int | None = None,
    ) -> pa.Table:
        """Rows of a table at main's head, a branch's head, a snapshot id, or as of a moment."""
        table = self.table(name)
        at_head = snapshot_id is None and as_of is None and branch is None
        snapshot_id = self.resolve_snapshot(table, snapshot_id=snapshot_id, as_of=as_of, branch=branch)
        # Main's head is read with the table's current schema, so a column just added shows (as NULL)
        # before the next write; an older snapshot is read with the schema it was written with.
        pinned = None if at_head else snapshot_id
        schema = _schema_at(table, pinned)
        if snapshot_id is None:
            return schema.empty_table() if columns is None else schema.empty_table().select(list(columns))
        scan = table.scan(
            snapshot_id=pinned,
            row_filter=row_filter if row_filter is not None else "true",
            selected_fields=tuple(columns) if columns else ("*",),
            limit=limit,
        )
        return scan.to_arrow()

    def resolve_snapshot(
        self,
        table: Table,
        *,
        snapshot_id: int | None = None,
        as_of: dt.datetime | None = None,
        branch: str | None = None,
    ) -> int | None:
        given = [x is not None for x in (snapshot_id, as_of, branch)]
        if sum(given) > 1:
            raise LakehouseError("read: give at most one of snapshot_id, as_of and branch")
        name = ".".join(table.name())
        if snapshot_id is not None:
            if table.snapshot_by_id(snapshot_id) is None:
                raise LakehouseError(
                    f"table {name!r} has no snapshot {snapshot_id} (expired or never existed; "
                    f"see 'keel tables {name}' for the snapshots kept)"
                )
            return snapshot_id
        if as_of is not None:
            if as_of.tzinfo is None:
                raise LakehouseError(f"read {name!r}: as_of={as_of!r} has no time zone; give an aware UTC datetime")
            snap = table.snapshot_as_of_timestamp(int(as_of.timestamp() * 1000))
            if snap is None:
                raise LakehouseError(
                    f"table {name!r} has no snapshot as of {as_of.isoformat()} (it did not exist yet, or the "
                    f"snapshots of that time have expired; see 'keel tables {name}' for the snapshots kept)"
                )
            return snap.snapshot_id
        if branch is not None:
            ref = table.refs().get(branch)
            if ref is None:
                raise LakehouseError(f"table {name!r} has no branch {branch!r} (branches: {sorted(table.refs())})")
            return ref.snapshot_id
        snap = table.current_snapshot()
        return snap.snapshot_id if snap else None

    def partition_rows(self, name: str, *, snapshot_id: int | None = None) -> dict[dt.date | str, int]:
        """Rows per partition at a snapshot (main's head by default)."""
        table = self.table(name)
        snapshot_id = snapshot_id or self.resolve_snapshot(table)
        if snapshot_id is None:
            return {}
        parts = table.inspect.partitions(snapshot_id=snapshot_id)
        if "partition" not in parts.column_names:
            # An unpartitioned table, or a snapshot with no manifests (a table's empty first snapshot).
            rows = sum(parts.column("record_count").to_pylist())
            return {"unpartitioned": rows} if rows else {}
        out: dict[dt.date | str, int] = {}
        for part, rows in zip(
            parts.column("partition").to_pylist(), parts.column("record_count").to_pylist(), strict=True
        ):
            value = next(iter(part.values())) if part else "unpartitioned"
            out[value] = out.get(value, 0) + rows
        return dict(sorted(out.items(), key=lambda kv: str(kv[0])))

    def snapshots(self, name: str) -> list[SnapshotInfo]:
        """Main's history, oldest first, with the keel properties of each snapshot.

        ``committed_at`` is when the snapshot became main's head: for a published audit branch,
        the publish, not the earlier write to the branch; reading ``as_of`` it returns that snapshot.
        """
        table = self.table(name)
        out = []
        for entry in table.history():
            snap = table.snapshot_by_id(entry.snapshot_id)
            if snap is None:
                continue
            summary = snap.summary
            props = dict(summary.additional_properties) if summary else {}
            out.append(
                SnapshotInfo(
                    snapshot_id=snap.snapshot_id,
                    parent_id=snap.parent_snapshot_id,
                    committed_at=dt.datetime.fromtimestamp(entry.timestamp_ms / 1000, dt.UTC),
                    operation=str(summary.operation.value) if summary else "",
                    properties={k: v for k, v in props.items() if k.startswith("keel.")},
                )
            )
        return out

    def snapshot_properties(
        self, source: str, partitions: Sequence[dt.date], run_id: str, **extra: str
    ) -> dict[str, str]:
        return {
            PROP_RUN_ID: run_id,
            PROP_PARTITION: partition_label(partitions),
            PROP_CODE_VERSION: self.code_version,
            PROP_SOURCE: source,
            **extra,
        }

    # maintenance

    def expire_snapshots(self, name: str, older_than: dt.timedelta, *, now: dt.datetime | None = None) -> list[int]:
        """Drop snapshots older than ``older_than`` (counted back from ``now``, the current time by
        default) that no branch or tag still needs.

        Every branch and tag head is kept, and so is each branch's own line of commits back to
        main's history: publishing walks that line to prove the branch fast-forwards main.
        """
        table = self.table(name)
        cutoff = (now or dt.datetime.now(dt.UTC)) - older_than
        protected = {ref.snapshot_id for ref in table.refs().values()}
        on_main = {entry.snapshot_id for entry in table.history()}
        for ref in table.refs().values():
            snapshot_id = ref.snapshot_id if ref.snapshot_ref_type == SnapshotRefType.BRANCH else None
            while snapshot_id is not None and snapshot_id not in on_main:
                protected.add(snapshot_id)
                snap = table.snapshot_by_id(snapshot_id)
                snapshot_id = snap.parent_snapshot_id if snap is not None else None
        expired = [
            s.snapshot_id
            for s in table.snapshots()
            if s.timestamp_ms < cutoff.timestamp() * 1000 and s.snapshot_id not in protected
        ]
        if expired:
            table.maintenance.expire_snapshots().by_ids(expired).commit()
        return expired

    def compact(self, name: str, *, day_column: str, run_id: str, min_files: int = 2) -> dict[dt.date, int]:
        """Rewrite each day with a partition (day, bucket) made of ``min_files`` or more files, one file a partition.

        Content is unchanged; the new snapshot says ``keel.source=compaction``. Returns the
        number of files each compacted day had.
        """
        table = self.table(name)
        head = self.resolve_snapshot(table)
        # A head without manifests (a new table's empty first snapshot) is one inspect.files cannot read.
        if head is None or not table.snapshot_by_id(head).manifests(table.io):
            return {}
        files = table.inspect.files(snapshot_id=head)
        counts: dict[tuple, int] = {}  # per partition: the day, and the entity bucket where there is one
        for part in files.column("partition").to_pylist():
            day = part.get(f"{day_column}_day") if part else None
            if isinstance(day, dt.date):
                key = (day, *(v for k, v in part.items() if k.endswith("_bucket")))
                counts[key] = counts.get(key, 0) + 1
        targets = {key[0]: n for key, n in counts.items() if n >= min_files}
        if not targets:
            return {}
        expr = day_filter(day_column, targets)
        data = table.scan(snapshot_id=head, row_filter=expr).to_arrow()
        props = self.snapshot_properties("compaction", list(targets), run_id)
        replace_rows(table, data, expr, props)
        return dict(sorted(targets.items()))


# What a SQL catalog's server raises when it is down or restarting (the connection refused or
# dropped); callers that can say so plainly catch these.
CATALOG_DOWN = (OperationalError, InterfaceError)


def open_catalog(settings: Settings) -> Catalog:
    """The Iceberg catalog named by the settings (SQLite file, PostgreSQL or REST).

    An ``s3://`` warehouse is read and written through pyiceberg's FileIO (pyarrow's S3 client) at
    ``settings.s3_endpoint`` when one is set; credentials and region come from the AWS variables."""
    uri = settings.catalog_uri
    properties = {"warehouse": settings.warehouse}
    if not settings.warehouse.startswith("file://"):
        # Table metadata is immutable: read once per process, not on every load (keel.lakehouse.file_io).
        properties["py-io-impl"] = "keel.lakehouse.file_io.MetadataCachingFileIO"
    if settings.s3_endpoint:
        # Path-style addressing: an endpoint of our own has no per-bucket host names. The region
        # is given, or pyiceberg would ask AWS itself which region the bucket is in.
        properties |= {
            "s3.endpoint": settings.s3_endpoint,
            "s3.force-virtual-addressing": "false",
            "s3.region": s3_region(),
        }
    if uri.startswith(("http://", "https://")):
        from pyiceberg.catalog.rest import RestCatalog

        return RestCatalog("keel", uri=uri, **properties)
    from pyiceberg.catalog.sql import SqlCatalog

    if uri.startswith("sqlite"):
        Path(uri.split(":///", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
    else:
        # A database server may restart under a long-lived process (serving, Dagster's code
        # server): check a pooled connection before using it rather than fail on the first call.
        properties["pool_pre_ping"] = "true"
    if settings.warehouse.startswith("file://"):
        Path(settings.warehouse.removeprefix("file://")).mkdir(parents=True, exist_ok=True)
    return SqlCatalog("keel", uri=uri, **properties)


def _schema_at(table: Table, snapshot_id: int | None) -> pa.Schema:
    from pyiceberg.io.pyarrow import schema_to_pyarrow

    schema = table.schema()
    if snapshot_id is not None:
        snap = table.snapshot_by_id(snapshot_id)
        if snap is not None and snap.schema_id is not None:
            schema = next((s for s in table.schemas().values() if s.schema_id == snap.schema_id), schema)
    return schema_to_pyarrow(schema, include_field_ids=False)
