"""Data quality of a table's days against its own history: each check on planted defects, the
weekday-aware volume check, the monitoring.quality writer and the errors for bad input."""

import datetime as dt
import re
import statistics

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from keel.monitoring.data_quality import (
    QUALITY_TABLE,
    DayQuality,
    Outcome,
    QualityRules,
    profile_days,
    quality_rows,
    write_quality,
)
from tests.factories.data_quality import DAY, SCHEMA, TABLE, TARGET, events, history, planted, write

NOW = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)


def profile(lake, days, *, now: dt.datetime = NOW) -> list[DayQuality]:
    return profile_days(lake, TARGET, days, now=now)


def outcome(result: DayQuality, check: str, column: str = "") -> Outcome:
    (found,) = [o for o in result.outcomes if o.check == check and o.column == column]
    return found


def test_a_planted_null_share_is_reported_at_its_counted_rate(lake):
    today = planted(events(DAY, 300), "amount", np.random.default_rng(2).choice(300, 45, replace=False), None)
    write(lake, *history(DAY, 28, 100), today)

    (result,) = profile(lake, [DAY])

    counted = today.column("amount").to_pylist().count(None)
    assert counted == 45
    amount = outcome(result, "nulls", "amount")
    assert (amount.value, amount.expected, amount.level) == (counted / 300, 0.0, "warn")
    assert amount.detail == "15.00% NULL (history 0.00%)"
    for column in ("session_id", "items", "currency", "channel"):
        clean = outcome(result, "nulls", column)
        assert (clean.value, clean.expected, clean.level) == (0.0, 0.0, "ok"), column
    # The day column and the key are not profiled.
    assert {o.column for o in result.outcomes if o.check == "nulls"} == {
        "session_id",
        "amount",
        "items",
        "currency",
        "channel",
    }


@pytest.mark.parametrize(
    ("history_nulls", "today_nulls", "level"),
    [
        (0, 14, "ok"),
        (0, 15, "warn"),  # 5%: the warn bound
        (0, 59, "warn"),
        (0, 60, "error"),  # 20%: the error bound
        (0, 72, "error"),
        (10, 72, "warn"),  # 24%, but 10% is usual: an increase of 14%
    ],
)
def test_the_null_verdict_flips_at_the_bounds_of_the_increase(lake, history_nulls, today_nulls, level):
    past = [planted(p, "amount", range(history_nulls), None) for p in history(DAY, 28, 100)]
    write(lake, *past, planted(events(DAY, 300), "amount", range(today_nulls), None))

    (result,) = profile(lake, [DAY])

    amount = outcome(result, "nulls", "amount")
    assert (amount.value, amount.expected, amount.level) == (today_nulls / 300, history_nulls / 100, level)


def test_values_outside_the_history_range_are_counted_exactly(lake):
    past = history(DAY, 28, 100)
    low, high = pc.min_max(pa.concat_tables(past).column("amount")).values()
    low, high = low.as_py(), high.as_py()
    inside = np.random.default_rng(3).uniform(20, 90, 300).round(2)
    today = events(DAY, 300).set_column(3, "amount", pa.array(inside))
    today = planted(today, "amount", range(0, 4), low - 1)
    today = planted(today, "amount", range(4, 7), high + 0.5)
    today = planted(today, "amount", [7], low)  # the history's own bounds are inside
    today = planted(today, "amount", [8], high)
    today = planted(today, "amount", [9, 10], None)  # NULLs are not values
    write(lake, *past, today)

    (result,) = profile(lake, [DAY])

    values = [v for v in today.column("amount").to_pylist() if v is not None]
    outside = sum(v < low or v > high for v in values)
    assert (outside, len(values)) == (7, 298)
    amount = outcome(result, "range", "amount")
    assert (amount.value, amount.level) == (7 / 298, "warn")
    assert amount.detail == f"7 of 298 values outside [{low:g}, {high:g}] (today [{low - 1:g}, {high + 0.5:g}])"
    items = outcome(result, "range", "items")
    assert (items.value, items.level, items.detail) == (0.0, "ok", "within [1, 5]")


@pytest.mark.parametrize(("outside", "level"), [(2, "ok"), (3, "warn"), (14, "warn"), (15, "error")])
def test_the_range_verdict_follows_the_share_outside(lake, outside, level):
    write(lake, *history(DAY, 28, 100), planted(events(DAY, 300), "items", range(outside), 9))

    (result,) = profile(lake, [DAY])

    items = outcome(result, "range", "items")
    assert (items.value, items.level) == (outside / 300, level)
    assert items.detail.startswith(f"{outside} of 300 values outside [1, 5]")


def test_categories_the_history_never_had_are_named(lake):
    today = planted(planted(events(DAY, 300), "currency", range(6), "CHF"), "currency", [6, 7], "JPY")
    write(lake, *history(DAY, 28, 100), today)

    (result,) = profile(lake, [DAY])

    currency = outcome(result, "categories", "currency")
    assert (currency.value, currency.level) == (8 / 300, "warn")
    assert currency.detail == "new: CHF, JPY (2.67% of rows)"
    channel = outcome(result, "categories", "channel")
    assert (channel.value, channel.level, channel.detail) == (0.0, "ok", "all 2 values seen before")
    # 2,800 distinct sessions in the history: an identifier, not judged as categories.
    session = outcome(result, "categories", "session_id")
    assert (session.value, session.level) == (None, "unknown")
    assert session.detail == "2800 distinct values in the history: an identifier, not a category"


def ending_at(part: pa.Table, newest: dt.datetime) -> pa.Table:
    """``part`` with its events a minute apart, the last at ``newest``."""
    times = [newest - dt.timedelta(minutes=i) for i in range(part.num_rows - 1, -1, -1)]
    return part.set_column(1, SCHEMA.field("event_ts"), pa.array(times, SCHEMA.field("event_ts").type))


def at(day: dt.date, hour: int, minute: int = 0) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(hour, minute), dt.UTC)


def test_freshness_is_the_age_of_the_newest_row_at_the_end_of_the_day_or_now(lake):
    yesterday = DAY - dt.timedelta(days=1)
    write(
        lake,
        *history(yesterday, 7, 100),
        ending_at(events(yesterday, 100), at(yesterday, 22)),
        ending_at(events(DAY, 100), at(DAY, 9, 30)),
    )

    past, today = profile(lake, [yesterday, DAY], now=at(DAY, 12))

    assert (outcome(past, "freshness").value, outcome(past, "freshness").level) == (7200.0, "ok")
    fresh = outcome(today, "freshness")
    assert (fresh.value, fresh.level) == (9000.0, "ok")
    assert fresh.detail == "newest row 2026-05-13T09:30:00+00:00, 2.5 h before 2026-05-13T12:00:00+00:00"


@pytest.mark.parametrize(
    ("age", "level"),
    [
        (dt.timedelta(hours=5, minutes=59), "ok"),
        (dt.timedelta(hours=6), "warn"),
        (dt.timedelta(hours=25), "warn"),
        (dt.timedelta(hours=26), "error"),
        (dt.timedelta(days=2), "error"),
    ],
)
def test_a_table_without_new_rows_is_stale(lake, age, level):
    now = at(DAY, 15)
    newest = now - age
    write(lake, *history(newest.date(), 7, 100), ending_at(events(newest.date(), 100), newest))

    (result,) = profile(lake, [DAY], now=now)

    fresh = outcome(result, "freshness")
    assert (fresh.value, fresh.level) == (age.total_seconds(), level)


def test_volume_is_judged_against_the_same_weekday(lake):
    # Five weeks from Monday 2026-04-13 to Sunday 2026-05-17: about 200 rows a weekday, 40 a weekend day.
    rng = np.random.default_rng(4)
    first = dt.date(2026, 4, 13)
    days = [first + dt.timedelta(days=i) for i in range(35)]
    counts = {d: int(rng.integers(36, 45) if d.weekday() >= 5 else rng.integers(190, 211)) for d in days}
    counts[DAY] = 40  # a Wednesday with a weekend's volume
    counts[DAY + dt.timedelta(days=2)] = 0  # a Friday without rows
    write(lake, *(events(d, n) for d, n in counts.items() if n))
    last_week = days[-7:]

    results = profile(lake, last_week)

    volume = {r.day: outcome(r, "volume") for r in results}
    assert {d: o.level for d, o in volume.items()} == {
        d: "error" if d in (DAY, DAY + dt.timedelta(days=2)) else "ok" for d in last_week
    }
    for d, o in volume.items():
        same_weekday = [counts[d - dt.timedelta(weeks=k)] for k in range(1, 5)]
        assert (o.value, o.expected) == (counts[d], statistics.median(same_weekday)), d
        assert "(same weekday, " in o.detail
    # The Saturday passes although it is far below a weekday's volume.
    saturday = dt.date(2026, 5, 16)
    weekday_mean = statistics.fmean(n for d, n in counts.items() if d.weekday() < 5 and d < last_week[0])
    assert volume[saturday].level == "ok" and counts[saturday] < weekday_mean / 4


def test_a_new_table_has_no_volume_verdict_until_it_has_history(lake):
    first = DAY - dt.timedelta(days=9)
    days = [first + dt.timedelta(days=i) for i in range(10)]
    write(lake, *(events(d, 300) for d in days))

    results = profile(lake, days)

    volume = [outcome(r, "volume") for r in results]
    assert [o.level for o in volume] == ["unknown"] * 2 + ["ok"] * 8
    assert volume[0].detail == volume[1].detail == "300 rows; too little history"
    # Fewer than two earlier Wednesdays, so the previous seven days are the basis.
    assert volume[-1].expected == 300.0 and "(last 7 days, " in volume[-1].detail


def quality_count(lake, table: str, day: dt.date, run_id: str) -> int:
    rows = lake.read(QUALITY_TABLE)
    start = dt.datetime.combine(day, dt.time(), dt.UTC)
    match = pc.and_(
        pc.and_(pc.equal(rows.column("table_name"), table), pc.equal(rows.column("run_id"), run_id)),
        pc.equal(rows.column("window_start"), pa.scalar(start, SCHEMA.field("event_ts").type)),
    )
    return pc.sum(match.cast(pa.int64())).as_py()


def test_writing_a_days_outcomes_again_replaces_them(lake):
    yesterday = DAY - dt.timedelta(days=1)
    write(lake, *history(yesterday, 7, 100), events(yesterday, 100), events(DAY, 100))
    days = [yesterday, DAY]
    results = profile(lake, days)
    rows = quality_rows(results, "run-1")
    # Volume, freshness, NULLs of 5 columns, ranges of 2 and categories of 3.
    per_day = 12
    assert [len(r.outcomes) for r in results] == [per_day, per_day] and rows.num_rows == 2 * per_day

    first = write_quality(lake, TABLE, days, rows, "run-1")
    second = write_quality(lake, TABLE, days, rows, "run-1")

    assert lake.read(QUALITY_TABLE).num_rows == 2 * per_day
    assert first != second == lake.head(QUALITY_TABLE)
    stored = lake.read(QUALITY_TABLE).filter(pc.equal(pc.field("check_name"), "volume")).sort_by("window_start")
    assert stored.select(["window_start", "window_end", "table_name", "value", "level"]).to_pylist() == [
        {
            "window_start": at(d, 0),
            "window_end": at(d + dt.timedelta(days=1), 0),
            "table_name": TABLE,
            "value": 100.0,
            "level": outcome(r, "volume").level,
        }
        for d, r in zip(days, results, strict=True)
    ]

    # Another table's outcomes sit beside them; a rerun of one day replaces that day only.
    other = DayQuality("raw.other", DAY, 5, [Outcome("volume", "", 5.0, 5.0, 3.0, 5.0, "ok", "5 rows")])
    write_quality(lake, "raw.other", [DAY], quality_rows([other], "run-1"), "run-1")
    write_quality(lake, TABLE, [DAY], quality_rows(results[1:], "run-2"), "run-2")

    assert lake.read(QUALITY_TABLE).num_rows == 2 * per_day + 1
    assert quality_count(lake, TABLE, yesterday, "run-1") == per_day
    assert quality_count(lake, TABLE, DAY, "run-1") == 0
    assert quality_count(lake, TABLE, DAY, "run-2") == per_day
    assert quality_count(lake, "raw.other", DAY, "run-1") == 1
    properties = lake.snapshots(QUALITY_TABLE)[-1].properties
    assert (properties["keel.source"], properties["keel.partition"], properties["keel.run_id"]) == (
        f"quality:{TABLE}",
        DAY.isoformat(),
        "run-2",
    )


def test_a_table_not_yet_written_is_named_with_the_fix(lake):
    with pytest.raises(
        ValueError, match=r"^data quality: table 'raw\.events' does not exist yet; materialize it first$"
    ):
        profile(lake, [DAY])
    assert profile(lake, []) == []


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        (
            {"null_increase": (0.3, 0.1)},
            "quality rules: null_increase=(0.3, 0.1) must be (warn, error) with 0 <= warn <= error",
        ),
        (
            {"freshness_s": (-1.0, 3600.0)},
            "quality rules: freshness_s=(-1.0, 3600.0) must be (warn, error) with 0 <= warn <= error",
        ),
        (
            {"history_days": 6},
            "quality rules: history_days=6 must be >= 7, weeks=4 >= 1, max_categories=1000 >= 1",
        ),
        (
            {"weeks": 0},
            "quality rules: history_days=28 must be >= 7, weeks=0 >= 1, max_categories=1000 >= 1",
        ),
    ],
)
def test_bad_rules_name_the_rule_and_its_valid_range(rules, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        QualityRules(**rules)
