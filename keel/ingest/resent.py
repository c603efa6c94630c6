"""Event ids arriving again: one copy of every event id in a raw table, whatever its day.

An ingest's validated rows wait in the staging database (table ``good``, keel.ingest.validation).
Before they are staged, each one whose event id main already holds is settled by its
source's rule (``EventSource.on_duplicate``):

- arriving again **unchanged** (same timestamp, same values): it lands again as it was,
  changing nothing, and is counted ``unchanged`` (re-ingesting a file leaves the table as it was);
- arriving with **other values or another timestamp**:
  - ``replace`` (the default): a correction. It lands, and its old copy leaves the day it sat
    in, in the same staging (``removals``, keel.lakehouse.wap.stage); counted ``replaced``;
  - ``quarantine``: refused with ``duplicate_event_id``, pointing at the landed copy; counted.

Finding the earlier copies scans main's event-id and timestamp columns only, in record
batches, keeping just the ids that match (bounded memory), over the whole table or, when the
source declares ``duplicates_within``, over the days within that distance of the incoming
ones. The ids the scan finds are then compared whole, on the days they sit in.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import duckdb
import pyarrow as pa
from pyiceberg.expressions import And, GreaterThanOrEqual, LessThan

from keel.dsl import EventSource, window_seconds
from keel.lakehouse.tables import Lakehouse, day_filter


@dataclass(frozen=True)
class Resent:
    """What became of the incoming rows whose event id main already held."""

    unchanged: int = 0
    replaced: int = 0
    duplicates: int = 0
    # Ids to take out of their old day: corrections that moved to another day.
    removals: dict[dt.date, list[str]] = field(default_factory=dict)
    scanned: int = 0  # rows of main looked through

    def properties(self) -> dict[str, str]:
        """The counts as snapshot properties (keel.rows.*)."""
        return {
            "keel.rows.unchanged": str(self.unchanged),
            "keel.rows.replaced": str(self.replaced),
            "keel.rows.duplicate": str(self.duplicates),
        }


def settle_resent(
    lake: Lakehouse, source: EventSource, con: duckdb.DuckDBPyConnection, snapshot_id: int | None
) -> Resent:
    """Settle the staging's rows (``good`` in ``con``) whose event id main holds at ``snapshot_id``.

    Unchanged rows stay and are counted; changed ones stay (``replace``, with their old copies
    listed in ``removals``) or move to ``bad`` (``quarantine``).
    """
    if not source.event_id or snapshot_id is None:
        return Resent()
    eid, ts = f'"{source.event_id}"', f'"{source.timestamp}"'
    # fetchall, not fetchone: DuckDB keeps a result open until it is read to the end.
    if not con.execute("SELECT count(*) FROM good").fetchall()[0][0]:
        return Resent()
    con.execute(f"CREATE OR REPLACE TEMP TABLE incoming AS SELECT DISTINCT {eid} AS id FROM good")
    con.execute("CREATE OR REPLACE TEMP TABLE landed (id VARCHAR, day DATE)")
    scanned = 0
    scan = lake.table(source.table_name).scan(
        snapshot_id=snapshot_id,
        row_filter=_horizon(con, source),
        selected_fields=(source.event_id, source.timestamp),
    )
    for batch in scan.to_arrow_batch_reader():
        scanned += batch.num_rows
        con.register("scanned", pa.Table.from_batches([batch]))
        con.execute(
            f"INSERT INTO landed SELECT s.{eid}, CAST(s.{ts} AS DATE) FROM scanned s SEMI JOIN incoming i "
            f"ON s.{eid} = i.id"
        )
        con.unregister("scanned")
    days = [d for (d,) in con.execute("SELECT DISTINCT day FROM landed ORDER BY day").fetchall()]
    if not days:
        return Resent(scanned=scanned)

    # The landed copies whole, from the days they sit in, to tell a re-send from a correction.
    old = lake.read(source.table_name, snapshot_id=snapshot_id, row_filter=day_filter(source.timestamp, days))
    con.register("old_days", old)
    con.execute(f"CREATE OR REPLACE TEMP TABLE old AS SELECT o.* FROM old_days o SEMI JOIN landed l ON o.{eid} = l.id")
    con.unregister("old_days")
    same = " AND ".join(f'g."{c.name}" IS NOT DISTINCT FROM o."{c.name}"' for c in source.all_columns())
    con.execute(
        "CREATE OR REPLACE TEMP TABLE matched AS SELECT g._file, g._row, "
        f"g.{eid} AS id, CAST(o.{ts} AS DATE) AS old_day, CAST(g.{ts} AS DATE) AS new_day, ({same}) AS unchanged "
        f"FROM good g JOIN old o ON g.{eid} = o.{eid}"
    )
    ((unchanged, changed),) = con.execute(
        "SELECT count(*) FILTER (WHERE unchanged), count(*) FILTER (WHERE NOT unchanged) FROM matched"
    ).fetchall()
    if source.on_duplicate == "quarantine":
        _quarantine_changed(con, source)
        return Resent(unchanged=unchanged, duplicates=changed, scanned=scanned)
    removals: dict[dt.date, list[str]] = {}
    for old_day, ident in con.execute(
        "SELECT old_day, id FROM matched WHERE NOT unchanged AND old_day <> new_day ORDER BY old_day, id"
    ).fetchall():
        removals.setdefault(old_day, []).append(ident)
    return Resent(unchanged=unchanged, replaced=changed, removals=removals, scanned=scanned)


def _horizon(con: duckdb.DuckDBPyConnection, source: EventSource):
    """The days of main an earlier copy is looked for in: all, or those within ``duplicates_within``."""
    if source.duplicates_within is None:
        return "true"
    ((first, last),) = con.execute(f'SELECT min("{source.timestamp}"), max("{source.timestamp}") FROM good').fetchall()
    reach = dt.timedelta(seconds=window_seconds(source.duplicates_within))
    return And(
        GreaterThanOrEqual(source.timestamp, (first - reach).isoformat()),
        LessThan(source.timestamp, (last + reach).isoformat()),
    )


def _quarantine_changed(con: duckdb.DuckDBPyConnection, source: EventSource) -> None:
    """The rows re-sent with other values go to ``bad``, each pointing at the day its landed copy is on."""
    eid = f'"{source.event_id}"'
    raw_json = ", ".join(f'"{c.name}" := CAST(g."{c.name}" AS VARCHAR)' for c in source.all_columns())
    con.execute(
        "INSERT INTO bad SELECT g._file, g._row, 'duplicate_event_id', "
        f"'{source.event_id} ' || to_json(g.{eid}) || ' already landed on ' || CAST(m.old_day AS VARCHAR) || "
        "' with other values (on_duplicate=''quarantine''; declare on_duplicate=''replace'' to take re-sent "
        f"events as corrections)', to_json(struct_pack({raw_json})) "
        "FROM good g JOIN matched m ON g._file = m._file AND g._row = m._row WHERE NOT m.unchanged"
    )
    con.execute("DELETE FROM good WHERE (_file, _row) IN (SELECT _file, _row FROM matched WHERE NOT unchanged)")
