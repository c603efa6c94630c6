"""The data quality assets through Dagster: planted defects fail their checks at the right
severity, the outcomes land in monitoring.quality, and a rerun replaces its day."""

import datetime as dt

import dagster as dg
import pyarrow.compute as pc

from assets import single_run_backfills
from assets.data_quality import quality_asset
from keel.monitoring.data_quality import CHECKS, QUALITY_TABLE
from resources import lakehouse_resource
from tests.factories.data_quality import DAY, TARGET, events, history, planted, write

UPSTREAM = dg.AssetKey(["raw", "events"])
PARTITIONS = dg.DailyPartitionsDefinition(start_date="2026-01-01", timezone="UTC")


def run_quality(settings, instance, *days: dt.date) -> dg.ExecuteInProcessResult:
    with single_run_backfills():
        asset = quality_asset(TARGET, UPSTREAM, PARTITIONS)
    key = dg.PartitionKeyRange(days[0].isoformat(), days[-1].isoformat())
    return dg.materialize(
        [asset],
        partition_key=None if len(days) > 1 else days[0].isoformat(),
        tags=(
            {"dagster/asset_partition_range_start": key.start, "dagster/asset_partition_range_end": key.end}
            if len(days) > 1
            else None
        ),
        resources={"lakehouse": lakehouse_resource(settings)},
        instance=instance,
    )


def evaluations(result: dg.ExecuteInProcessResult) -> dict[str, dg.AssetCheckEvaluation]:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def test_planted_nulls_and_new_categories_fail_with_error_and_the_rest_pass(settings, lake, instance):
    today = events(DAY, 300)
    today = planted(today, "amount", range(90), None)  # 30% NULL where the history has none
    today = planted(today, "currency", range(100, 130), "JPY")  # 10% a currency never seen
    write(lake, *history(DAY, 28, 300), today)

    result = run_quality(settings, instance, DAY)

    assert result.success
    checks = evaluations(result)
    assert set(checks) == set(CHECKS)
    assert not checks["nulls"].passed and checks["nulls"].severity == dg.AssetCheckSeverity.ERROR
    assert "amount: 30.00% NULL" in checks["nulls"].description
    assert not checks["categories"].passed and checks["categories"].severity == dg.AssetCheckSeverity.ERROR
    assert "JPY" in checks["categories"].description
    assert all(checks[name].passed for name in ("range", "freshness", "volume")), {
        n: c.description for n, c in checks.items()
    }

    (materialization,) = result.get_asset_materialization_events()
    metadata = materialization.materialization.metadata
    assert metadata["table"].value == TARGET.table and metadata["profiled_rows"].value > 0
    assert metadata["level_nulls"].value == "error" and metadata["level_range"].value == "ok"
    assert "| nulls | amount | error |" in metadata["problems"].value

    rows = lake.read(QUALITY_TABLE)
    assert set(rows.column("table_name").to_pylist()) == {TARGET.table}
    errors = rows.filter(pc.equal(rows.column("level"), "error"))
    assert sorted(
        zip(errors.column("check_name").to_pylist(), errors.column("column_name").to_pylist(), strict=True)
    ) == [
        ("categories", "currency"),
        ("nulls", "amount"),
    ]
    assert set(rows.column("run_id").to_pylist()) == {result.run_id}


def test_a_clean_day_passes_every_check_and_a_rerun_replaces_its_rows(settings, lake, instance):
    write(lake, *history(DAY, 28, 300), events(DAY, 300))

    first = run_quality(settings, instance, DAY)
    written = lake.read(QUALITY_TABLE).num_rows
    second = run_quality(settings, instance, DAY)

    assert all(c.passed for c in evaluations(first).values()), {n: c.description for n, c in evaluations(first).items()}
    rows = lake.read(QUALITY_TABLE)
    assert written > 0 and rows.num_rows == written
    assert set(rows.column("run_id").to_pylist()) == {second.run_id}
    assert set(rows.column("level").to_pylist()) <= {"ok", "unknown"}


def test_a_range_run_judges_every_day_and_the_checks_speak_of_the_last(settings, lake, instance):
    days = [DAY - dt.timedelta(days=2), DAY - dt.timedelta(days=1), DAY]
    past = history(days[0], 28, 300)
    broken = planted(events(days[0], 300), "amount", range(90), None)  # the first day is broken, the last is not
    write(lake, *past, broken, events(days[1], 300), events(DAY, 300))

    result = run_quality(settings, instance, *days)

    checks = evaluations(result)
    assert checks["nulls"].passed and checks["nulls"].metadata["day"].value == str(DAY)
    rows = lake.read(QUALITY_TABLE)
    starts = sorted({d.date() for d in rows.column("window_start").to_pylist()})
    assert starts == days
    errors = rows.filter(pc.equal(rows.column("level"), "error"))
    assert [d.date() for d in errors.column("window_start").to_pylist()] == [days[0]]
    # Each day's materialization speaks of that day: the broken first day, the clean others.
    by_day = {
        e.materialization.partition: e.materialization.metadata for e in result.get_asset_materialization_events()
    }
    assert sorted(by_day) == [d.isoformat() for d in days]
    assert by_day[days[0].isoformat()]["level_nulls"].value == "error"
    assert "| nulls | amount | error |" in by_day[days[0].isoformat()]["problems"].value
    assert [by_day[d.isoformat()]["problems"].value for d in days[1:]] == ["none", "none"]
