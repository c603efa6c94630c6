"""Data quality of a table, one UTC day at a time, against the table's own recent history.

For each day the profile (rows, and per column the NULL share, the range of numbers and the
categories of strings) is computed in one DuckDB pass over the day and the ``history_days``
before it, then judged:

- ``nulls``: a column's NULL share against its mean over the history;
- ``range``: the share of a numeric column's values outside the history's [min, max];
- ``categories``: the share of a string column's rows holding a value the history never had
  (columns with more than ``max_categories`` distinct values, such as ids, are left out);
- ``freshness``: the age of the newest row at the end of the day (for today, now);
- ``volume``: the day's rows against the same weekday of the previous ``weeks`` weeks (the
  median, and a spread from their median absolute deviation, at least the square root of the
  median as for a count), or the previous seven days when fewer than two such weekdays exist.

Each outcome is ``ok``, ``warn``, ``error`` or ``unknown`` (too little history).
``quality_rows`` flattens them into ``monitoring.quality``.
"""

from __future__ import annotations

import datetime as dt
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

import duckdb
import pyarrow as pa
from pyiceberg.expressions import And, EqualTo, GreaterThanOrEqual, LessThan

from keel.lakehouse.tables import Lakehouse, day_filter, replace_rows

QUALITY_TABLE = "monitoring.quality"
CHECKS = ("nulls", "range", "categories", "freshness", "volume")
DAY = dt.timedelta(days=1)
SCHEMA = pa.schema(
    [
        pa.field("window_start", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("window_end", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("table_name", pa.string(), nullable=False),
        pa.field("column_name", pa.string(), nullable=False),  # "" for table-wide checks
        pa.field("check_name", pa.string(), nullable=False),
        pa.field("value", pa.float64()),
        pa.field("expected", pa.float64()),
        pa.field("warn", pa.float64()),
        pa.field("error", pa.float64()),
        pa.field("level", pa.string(), nullable=False),
        pa.field("detail", pa.string()),
        pa.field("run_id", pa.string()),
        pa.field("computed_at", pa.timestamp("us", tz="UTC")),
    ]
)


@dataclass(frozen=True)
class QualityRules:
    """Warn and error bounds per check; shares are fractions of rows."""

    null_increase: tuple[float, float] = (0.05, 0.2)  # NULL share above the history's mean
    out_of_range: tuple[float, float] = (0.01, 0.05)
    new_categories: tuple[float, float] = (0.001, 0.05)
    freshness_s: tuple[float, float] = (6 * 3600.0, 26 * 3600.0)
    volume_z: tuple[float, float] = (3.0, 5.0)
    history_days: int = 28
    weeks: int = 4
    max_categories: int = 1000

    def __post_init__(self) -> None:
        for name in ("null_increase", "out_of_range", "new_categories", "freshness_s", "volume_z"):
            warn, error = getattr(self, name)
            if not 0 <= warn <= error:
                raise ValueError(
                    f"quality rules: {name}={(warn, error)!r} must be (warn, error) with 0 <= warn <= error"
                )
        if self.history_days < 7 or self.weeks < 1 or self.max_categories < 1:
            raise ValueError(
                f"quality rules: history_days={self.history_days} must be >= 7, weeks={self.weeks} >= 1, "
                f"max_categories={self.max_categories} >= 1"
            )


@dataclass(frozen=True)
class QualityTarget:
    """A table to watch: its day column, the columns that identify rows, and columns to leave out."""

    table: str
    day_column: str
    keys: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    rules: QualityRules = field(default_factory=QualityRules)


@dataclass(frozen=True)
class Outcome:
    check: str
    column: str
    value: float | None
    expected: float | None
    warn: float
    error: float
    level: str
    detail: str


@dataclass
class DayQuality:
    table: str
    day: dt.date
    rows: int
    outcomes: list[Outcome] = field(default_factory=list)

    def worst(self, check: str) -> str:
        levels = [o.level for o in self.outcomes if o.check == check]
        for level in ("error", "warn", "ok"):
            if level in levels:
                return level
        return "unknown"

    def failing(self, check: str) -> list[Outcome]:
        return [o for o in self.outcomes if o.check == check and o.level in ("warn", "error")]


def project_targets(project) -> list[QualityTarget]:
    """The tables a project's quality is watched on: every feature table, and the inference log."""
    from keel.inference_log.records import TABLE as INFERENCE_LOG_TABLE

    targets = [
        QualityTarget(group.table_name, "feature_ts", keys=tuple(group.entity.join_keys))
        for group in project.feature_groups
    ]
    targets.append(
        QualityTarget(
            INFERENCE_LOG_TABLE,
            "ts",
            keys=("log_id", "request_id", "entity_id"),
            exclude=("features", "missing_features"),
        )
    )
    return targets


def profile_days(
    lake: Lakehouse, target: QualityTarget, days: Sequence[dt.date], *, now: dt.datetime | None = None
) -> list[DayQuality]:
    """Judge each of ``days`` against the history before it (read once for the whole range)."""
    if not days:
        return []
    if not lake.exists(target.table):
        raise ValueError(f"data quality: table {target.table!r} does not exist yet; materialize it first")
    now = now or dt.datetime.now(dt.UTC)
    rules = target.rules
    span = sorted({*(min(days) - dt.timedelta(days=i) for i in range(1, rules.history_days + 1)), *days})
    data = lake.read(target.table, row_filter=day_filter(target.day_column, span))
    skip = {target.day_column, *target.keys, *target.exclude}
    numeric = [f.name for f in data.schema if f.name not in skip and _is_number(f.type)]
    text = [f.name for f in data.schema if f.name not in skip and _is_text(f.type)]
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    try:
        con.register("t", data)
        profiles = _profiles(con, target.day_column, numeric, text)
        # Days before the first row read are before the table began, not days without rows.
        first = min(profiles, default=None)
        out = []
        for d in sorted(days):
            history = [h for h in span if h < d and (d - h).days <= rules.history_days]
            today = profiles.get(d)
            past = [profiles[h] for h in history if h in profiles]
            result = DayQuality(target.table, d, today.rows if today else 0)
            counts = {h: profiles[h].rows if h in profiles else 0 for h in history if first is not None and h >= first}
            result.outcomes.append(_volume(d, result.rows, counts, rules))
            result.outcomes.append(_freshness(d, today, past, now, rules))
            for c in [*numeric, *text]:
                result.outcomes.append(_nulls(c, today, past, rules))
            for c in numeric:
                result.outcomes.append(_range(con, target.day_column, d, c, today, past, rules))
            for c in text:
                result.outcomes.append(_categories(c, today, past, rules))
            out.append(result)
    finally:
        con.close()
    return out


@dataclass
class _Profile:
    rows: int
    newest: dt.datetime | None
    non_null: dict[str, int]
    ranges: dict[str, tuple[float | None, float | None]]
    categories: dict[str, dict[str, int]]


def _profiles(con, day_column: str, numeric: list[str], text: list[str]) -> dict[dt.date, _Profile]:
    """Each day's rows, newest row, non-NULL counts, numeric ranges and string value counts."""
    day = f'CAST("{day_column}" AS DATE)'
    columns = [*numeric, *text]
    aggregates = ["count(*)", f'max("{day_column}")']
    aggregates += [f'count("{c}")' for c in columns]
    aggregates += [f'min("{c}")::DOUBLE, max("{c}")::DOUBLE' for c in numeric]
    out = {}
    for row in con.sql(f"SELECT {day}, {', '.join(aggregates)} FROM t GROUP BY 1").fetchall():
        counts = row[3 : 3 + len(columns)]
        bounds = row[3 + len(columns) :]
        out[row[0]] = _Profile(
            rows=row[1],
            newest=row[2],
            non_null=dict(zip(columns, counts, strict=True)),
            ranges={c: (bounds[2 * i], bounds[2 * i + 1]) for i, c in enumerate(numeric)},
            categories={c: {} for c in text},
        )
    for c in text:
        sql = f'SELECT {day}, CAST("{c}" AS VARCHAR), count(*) FROM t WHERE "{c}" IS NOT NULL GROUP BY 1, 2'
        for d, value, n in con.sql(sql).fetchall():
            out[d].categories[c][value] = n
    return out


def _is_number(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind)


def _is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_boolean(kind)


def _level(value: float | None, bounds: tuple[float, float]) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "unknown"
    return "error" if value >= bounds[1] else "warn" if value >= bounds[0] else "ok"


def _nulls(column: str, today: _Profile | None, past: list[_Profile], rules: QualityRules) -> Outcome:
    # From the NULL count, not 1 - non-NULL share: 20 of 100 must be 0.2, not 0.19999999999999996.
    share = (today.rows - today.non_null[column]) / today.rows if today and today.rows else None
    seen = [(p.rows - p.non_null[column]) / p.rows for p in past if p.rows]
    base = statistics.fmean(seen) if seen else None
    increase = None if share is None or base is None else max(0.0, share - base)
    warn, error = rules.null_increase
    if share is None:
        detail = "no rows today"
    else:
        detail = f"{share:.2%} NULL" + (f" (history {base:.2%})" if base is not None else ", no history")
    return Outcome("nulls", column, share, base, warn, error, _level(increase, rules.null_increase), detail)


def _range(con, day_column: str, d: dt.date, column: str, today, past, rules: QualityRules) -> Outcome:
    warn, error = rules.out_of_range
    lows = [p.ranges[column][0] for p in past if p.ranges[column][0] is not None]
    highs = [p.ranges[column][1] for p in past if p.ranges[column][1] is not None]
    low_today, high_today = today.ranges[column] if today else (None, None)
    if low_today is None or not lows:
        return Outcome("range", column, None, None, warn, error, "unknown", "no values today or no history")
    lo, hi = min(lows), max(highs)
    if lo <= low_today and high_today <= hi:
        return Outcome("range", column, 0.0, None, warn, error, "ok", f"within [{lo:g}, {hi:g}]")
    outside = con.execute(
        f'SELECT count(*) FROM t WHERE CAST("{day_column}" AS DATE) = ? AND ("{column}" < ? OR "{column}" > ?)',
        [d, lo, hi],
    ).fetchone()[0]
    total = today.non_null[column]
    share = outside / total if total else 0.0
    detail = f"{outside} of {total} values outside [{lo:g}, {hi:g}] (today [{low_today:g}, {high_today:g}])"
    return Outcome("range", column, share, None, warn, error, _level(share, rules.out_of_range), detail)


def _categories(column: str, today: _Profile | None, past: list[_Profile], rules: QualityRules) -> Outcome:
    warn, error = rules.new_categories
    known: set[str] = set()
    for p in past:
        known.update(p.categories[column])
    values = today.categories[column] if today else {}
    if not known or not values:
        return Outcome("categories", column, None, None, warn, error, "unknown", "no values today or no history")
    if len(known) > rules.max_categories:
        detail = f"{len(known)} distinct values in the history: an identifier, not a category"
        return Outcome("categories", column, None, None, warn, error, "unknown", detail)
    new = {v: n for v, n in values.items() if v not in known}
    share = sum(new.values()) / sum(values.values())
    shown = ", ".join(sorted(new)[:5]) + (" ..." if len(new) > 5 else "")
    detail = f"new: {shown} ({share:.2%} of rows)" if new else f"all {len(values)} values seen before"
    return Outcome("categories", column, share, None, warn, error, _level(share, rules.new_categories), detail)


def _freshness(d: dt.date, today: _Profile | None, past: list[_Profile], now: dt.datetime, rules) -> Outcome:
    warn, error = rules.freshness_s
    end = min(now, dt.datetime.combine(d, dt.time(), dt.UTC) + DAY)
    newest = [p.newest for p in [*past, today] if p is not None and p.newest is not None]
    if not newest:
        return Outcome("freshness", "", None, None, warn, error, "unknown", "no rows today or in the history")
    latest = max(t if t.tzinfo else t.replace(tzinfo=dt.UTC) for t in newest)
    age = max(0.0, (end - latest).total_seconds())
    detail = f"newest row {latest.isoformat(timespec='seconds')}, {age / 3600:.1f} h before {end.isoformat(timespec='seconds')}"
    return Outcome("freshness", "", age, None, warn, error, _level(age, rules.freshness_s), detail)


def _volume(d, n, history: dict[dt.date, int], rules) -> Outcome:
    warn, error = rules.volume_z
    same_weekday = [history[h] for h in history if (d - h).days % 7 == 0 and (d - h).days <= 7 * rules.weeks]
    basis = same_weekday if len(same_weekday) >= 2 else [history[h] for h in history if (d - h).days <= 7]
    if len(basis) < 2:
        return Outcome("volume", "", float(n), None, warn, error, "unknown", f"{n} rows; too little history")
    expected = statistics.median(basis)
    mad = statistics.median(abs(b - expected) for b in basis) * 1.4826
    spread = max(mad, math.sqrt(expected), 1.0)
    z = abs(n - expected) / spread
    level = "error" if n == 0 and expected > 0 else _level(z, rules.volume_z)
    which = "same weekday" if basis is same_weekday else "last 7 days"
    detail = f"{n} rows, expected {expected:g} ± {spread:.1f} ({which}, z={z:.1f})"
    return Outcome("volume", "", float(n), float(expected), warn, error, level, detail)


def quality_rows(results: Sequence[DayQuality], run_id: str) -> pa.Table:
    now = dt.datetime.now(dt.UTC)
    rows = [
        {
            "window_start": dt.datetime.combine(r.day, dt.time(), dt.UTC),
            "window_end": dt.datetime.combine(r.day, dt.time(), dt.UTC) + DAY,
            "table_name": r.table,
            "column_name": o.column,
            "check_name": o.check,
            "value": o.value,
            "expected": o.expected,
            "warn": o.warn,
            "error": o.error,
            "level": o.level,
            "detail": o.detail,
            "run_id": run_id,
            "computed_at": now,
        }
        for r in results
        for o in r.outcomes
    ]
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def write_quality(lake: Lakehouse, table: str, days: Sequence[dt.date], rows: pa.Table, run_id: str) -> int:
    """Replace the table's outcomes of ``days`` in one snapshot."""
    out = lake.ensure_table(QUALITY_TABLE, SCHEMA, month_column="window_start", identity_column="table_name")
    first = dt.datetime.combine(min(days), dt.time(), dt.UTC)
    last = dt.datetime.combine(max(days), dt.time(), dt.UTC) + DAY
    where = And(
        And(GreaterThanOrEqual("window_start", first.isoformat()), LessThan("window_start", last.isoformat())),
        EqualTo("table_name", table),
    )
    replace_rows(out, rows, where, lake.snapshot_properties(f"quality:{table}", sorted(days), run_id))
    return lake.head(QUALITY_TABLE)
