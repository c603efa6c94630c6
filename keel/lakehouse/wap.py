"""Write-audit-publish on Iceberg branches.

1. ``stage``: new data goes to a branch ``audit_<run id>`` cut from main's head. Each
   partition written is replaced whole (``replace``) or upserted by key (``merge``), so a
   rerun of the same input leaves the same content, never a second copy.
2. The caller audits the branch (``keel.lakehouse.audit``); main is untouched meanwhile.
3. ``publish``: main moves to the branch head only if that is a fast-forward, i.e. main's
   head is still an ancestor of the branch head. The catalog commit asserts main's head, so
   a concurrent writer makes the publish fail instead of losing either write.

A failed audit keeps the branch for inspection; ``discard`` removes it.

Every table written this way (raw events, feature groups, predictions, the inference log)
has a ``Writer``: it stages a run's rows and audits a staged write. ``publish_or_restage``
publishes, and when another writer moved main after this run staged, stages the run again
on the new head, audits that, and publishes it: a conflict costs a second staging, never a
failed run or a lost write.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import duckdb
import pyarrow as pa
from pyiceberg.exceptions import CommitFailedException

from keel.lakehouse.tables import (
    PROP_BASE_SNAPSHOT,
    Lakehouse,
    LakehouseError,
    day_filter,
    days_of,
    partition_label,
    replace_rows,
)

if TYPE_CHECKING:
    from keel.lakehouse.audit import AuditReport

BRANCH_PREFIX = "audit_"
# Publishing gives up after this many stagings in a row lost the race to another writer.
PUBLISH_ATTEMPTS = 3


class PublishConflict(LakehouseError):
    """Main moved since the branch was staged; the branch cannot be fast-forwarded."""


class AuditFailed(LakehouseError):
    """A staged write failed its audit; main is untouched and the branch kept for inspection."""

    def __init__(self, staged: StagedWrite, report: AuditReport) -> None:
        super().__init__(
            f"table {staged.table!r}: the audit of {staged.partition} failed ({report.summary()}); main is "
            f"unchanged and branch {staged.branch!r} is kept for inspection"
        )
        self.staged = staged
        self.report = report


@dataclass(frozen=True)
class StagedWrite:
    table: str
    branch: str
    run_id: str
    snapshot_id: int
    base_snapshot_id: int | None
    days: tuple[dt.date, ...]
    rows: int

    @property
    def partition(self) -> str:
        return partition_label(self.days)


class Staging(Protocol):
    """What a writer's ``stage`` returns: the staged write, and whatever else it learned."""

    @property
    def staged(self) -> StagedWrite: ...


class Writer(Protocol):
    """A table written through write-audit-publish: it stages a run's rows and audits a staged write.

    ``stage`` must be repeatable: staging the same run again starts its branch afresh from
    main's current head (``stage`` below does), so a re-stage after a conflict is exact.
    """

    @property
    def table(self) -> str: ...

    def stage(self, run_id: str) -> Staging: ...

    def audit(self, staged: StagedWrite) -> AuditReport: ...


@dataclass(frozen=True)
class Published:
    """A run's write on main: the staged write that was published and main's heads around it."""

    staged: StagedWrite
    snapshot_id: int
    previous_snapshot_id: int | None
    restaged: int = 0  # times main moved after staging and the run staged again
    staging: Staging | None = None  # what the last re-stage returned (None: published as first staged)


def publish_or_restage(
    lake: Lakehouse, writer: Writer, staged: StagedWrite, *, attempts: int = PUBLISH_ATTEMPTS
) -> Published:
    """Publish ``staged``; when main moved since, stage the run again on the new head, audit it and publish.

    Raises ``AuditFailed`` when a re-staged write fails its audit, and ``PublishConflict``
    when every one of ``attempts`` stagings lost the race to another writer.
    """
    staging: Staging | None = None
    for attempt in range(attempts):
        previous = lake.head(staged.table)
        try:
            return Published(staged, publish(lake, staged), previous, attempt, staging)
        except PublishConflict:
            if attempt == attempts - 1:
                raise
        staging = writer.stage(staged.run_id)
        staged = staging.staged
        report = writer.audit(staged)
        if not report.success:
            raise AuditFailed(staged, report)
    raise AssertionError("unreachable: the last attempt returns or raises")


def branch_name(run_id: str) -> str:
    """The audit branch of a run; Iceberg ref names allow most characters, we keep them tame."""
    return BRANCH_PREFIX + re.sub(r"[^A-Za-z0-9_\-]", "_", run_id)


def stage(
    lake: Lakehouse,
    table_name: str,
    chunks: Iterable[pa.Table],
    *,
    run_id: str,
    source: str,
    day_column: str,
    mode: str = "replace",
    key: str | None = None,
    days: Iterable[dt.date] = (),
    properties: dict[str, str] | None = None,
    removals: Mapping[dt.date, Sequence[str]] | None = None,
) -> StagedWrite:
    """Write ``chunks`` to the run's audit branch, one commit per chunk.

    ``replace`` makes each day present in a chunk (plus any listed in ``days``) hold exactly
    that chunk's rows for the day; ``merge`` keeps a day's existing rows whose ``key`` is not
    among the chunk's and adds the chunk's rows. ``removals`` (merge only) are keys to take out
    of the days they sit in: rows that moved to another day, whose old copy must go in the same
    staging. A chunk should hold whole days. Staging the same run again starts the branch
    afresh, so a retried step never doubles its data. ``properties`` are added to every
    snapshot's keel.* properties (e.g. a definition's version, the rows replaced).
    """
    if mode not in ("replace", "merge"):
        raise ValueError(f"stage {table_name!r}: mode {mode!r} is not known (use 'replace' or 'merge')")
    if mode == "merge" and not key:
        raise ValueError(f"stage {table_name!r}: mode 'merge' needs the key column that identifies a row")
    removals = {d: list(ids) for d, ids in (removals or {}).items() if ids}
    if removals and mode != "merge":
        raise ValueError(f"stage {table_name!r}: removals need mode 'merge' and a key")
    table = lake.table(table_name)
    branch = branch_name(run_id)
    base = lake.resolve_snapshot(table)
    manage = table.manage_snapshots()
    if branch in table.refs():
        manage = manage.remove_branch(branch)
    if base is not None:
        manage = manage.create_branch(base, branch)
    manage.commit()

    schema = table.schema().as_arrow()
    written_days: set[dt.date] = set()
    rows = 0

    def write(data: pa.Table, chunk_days: set[dt.date]) -> None:
        nonlocal rows
        if chunk_days & written_days:
            raise LakehouseError(
                f"stage {table_name!r}: day(s) {partition_label(sorted(chunk_days & written_days))} appear in two "
                "chunks; each chunk must hold whole days"
            )
        if mode == "merge" and base is not None:
            existing = lake.read(table_name, snapshot_id=base, row_filter=day_filter(day_column, chunk_days))
            gone = [k for d in chunk_days for k in removals.get(d, ())]
            data = _merge(existing, data, key, schema, gone)
        extra = dict(properties or {})
        if base is not None:
            extra[PROP_BASE_SNAPSHOT] = str(base)
        props = lake.snapshot_properties(source, sorted(chunk_days), run_id, **extra)
        replace_rows(lake.table(table_name), data, day_filter(day_column, chunk_days), props, branch)
        written_days.update(chunk_days)
        rows += data.num_rows

    for chunk in chunks:
        if chunk.num_rows:
            write(_conform(chunk, schema), set(days_of(chunk, day_column)))
    emptied = set(days) - written_days
    if emptied:
        write(schema.empty_table(), emptied)
    for day in sorted(set(removals) - written_days):
        # A day that only loses rows (they moved to another day): rewritten without them.
        write(schema.empty_table(), {day})
    if not written_days:
        discard(lake, table_name, run_id)
        raise LakehouseError(f"stage {table_name!r}: nothing was written (the input held no rows and no days)")
    head = lake.head(table_name, branch)
    return StagedWrite(table_name, branch, run_id, head, base, tuple(sorted(written_days)), rows)


def recent_partition_rows(lake: Lakehouse, table_name: str, staged_days: Iterable[dt.date], count: int) -> list[int]:
    """Row counts of main's latest ``count`` day partitions before the first staged day: the audit's history.

    Only earlier days count: a backfill landing old days is judged against the days before
    them, not against later days that did not exist yet when those days happened.
    """
    first = min(staged_days, default=None)
    history = sorted(
        (day, rows)
        for day, rows in lake.partition_rows(table_name).items()
        if isinstance(day, dt.date) and (first is None or day < first)
    )
    return [rows for _, rows in history[-count:]]


def find_staged(lake: Lakehouse, table_name: str, run_id: str) -> StagedWrite:
    """The staged write of a run, read back from its branch (for a publish in another step)."""
    table = lake.table(table_name)
    branch = branch_name(run_id)
    ref = table.refs().get(branch)
    if ref is None:
        raise LakehouseError(
            f"table {table_name!r} has no branch {branch!r}: run {run_id!r} staged nothing "
            "(or it was published or discarded already)"
        )
    days: set[dt.date] = set()
    base: int | None = None
    snap = table.snapshot_by_id(ref.snapshot_id)
    main_ancestors = set(_ancestors(table, lake.head(table_name)))
    while snap is not None and snap.snapshot_id not in main_ancestors:
        props = dict(snap.summary.additional_properties) if snap.summary else {}
        if props.get("keel.run_id") != run_id:
            break
        days |= _parse_days(props.get("keel.partition", ""))
        if PROP_BASE_SNAPSHOT in props:
            base = int(props[PROP_BASE_SNAPSHOT])
        snap = table.snapshot_by_id(snap.parent_snapshot_id) if snap.parent_snapshot_id else None
    rows = sum(v for k, v in lake.partition_rows(table_name, snapshot_id=ref.snapshot_id).items() if k in days)
    return StagedWrite(table_name, branch, run_id, ref.snapshot_id, base, tuple(sorted(days)), rows)


def publish(lake: Lakehouse, staged: StagedWrite) -> int:
    """Fast-forward main to the staged branch head and drop the branch; returns main's new head."""
    table = lake.table(staged.table)
    ref = table.refs().get(staged.branch)
    if ref is None or ref.snapshot_id != staged.snapshot_id:
        raise LakehouseError(
            f"table {staged.table!r}: branch {staged.branch!r} no longer points at the staged snapshot "
            f"{staged.snapshot_id}; stage the run again"
        )
    main = lake.head(staged.table)
    if main is not None and main not in _ancestors(table, staged.snapshot_id):
        raise PublishConflict(
            f"table {staged.table!r}: main moved to snapshot {main} after run {staged.run_id!r} staged "
            f"on {staged.base_snapshot_id}; publishing would discard that write. Stage the run again "
            f"on the new head (rerun it); branch {staged.branch!r} is kept for inspection"
        )
    try:
        table.manage_snapshots().set_current_snapshot(snapshot_id=staged.snapshot_id).remove_branch(
            staged.branch
        ).commit()
    except CommitFailedException as exc:
        raise PublishConflict(
            f"table {staged.table!r}: main changed while run {staged.run_id!r} was publishing ({exc}); "
            "rerun to stage on the new head"
        ) from exc
    return staged.snapshot_id


def discard(lake: Lakehouse, table_name: str, run_id: str) -> bool:
    """Remove a run's audit branch; True if there was one."""
    table = lake.table(table_name)
    branch = branch_name(run_id)
    if branch not in table.refs():
        return False
    table.manage_snapshots().remove_branch(branch).commit()
    return True


def _ancestors(table, snapshot_id: int | None) -> list[int]:
    out = []
    while snapshot_id is not None:
        out.append(snapshot_id)
        snap = table.snapshot_by_id(snapshot_id)
        snapshot_id = snap.parent_snapshot_id if snap is not None else None
    return out


def _parse_days(label: str) -> set[dt.date]:
    if not label:
        return set()
    if ".." in label:
        start, end = (dt.date.fromisoformat(p) for p in label.split(".."))
        return {start + dt.timedelta(days=i) for i in range((end - start).days + 1)}
    return {dt.date.fromisoformat(p) for p in label.split(",")}


def _conform(data: pa.Table, schema: pa.Schema) -> pa.Table:
    """Order and type ``data``'s columns as the table's, filling columns it lacks with NULL."""
    columns = []
    for field in schema:
        if field.name in data.column_names:
            columns.append(data.column(field.name).cast(field.type))
        elif field.nullable:
            columns.append(pa.nulls(data.num_rows, field.type))
        else:
            raise LakehouseError(f"data lacks required column {field.name!r} of the table")
    return pa.Table.from_arrays(columns, schema=schema)


def _merge(existing: pa.Table, new: pa.Table, key: str, schema: pa.Schema, gone: Sequence[str] = ()) -> pa.Table:
    """Existing rows whose key is neither in ``new`` nor in ``gone``, then ``new``'s rows, typed as ``schema``."""
    if existing.num_rows == 0:
        return new
    con = duckdb.connect()
    con.register("existing", _conform(existing, schema))
    con.register("new", new.select([key]))
    con.register("gone", pa.table({key: pa.array(list(gone), existing.schema.field(key).type)}))
    kept = con.sql(
        f'SELECT e.* FROM existing e ANTI JOIN (SELECT "{key}" FROM new UNION ALL SELECT "{key}" FROM gone) k '
        f'ON e."{key}" = k."{key}"'
    ).to_arrow_table()
    return pa.concat_tables([_conform(kept, schema), new])
