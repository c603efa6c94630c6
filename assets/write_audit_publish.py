"""One asset per table written through write-audit-publish: the factory every such table uses.

Raw events, feature groups, batch predictions and the inference log are each one asset in
the graph. The asset is a graph of three steps that every run materializing it runs together:

1. ``stage`` writes the run's rows to the table's branch ``audit_<run id>`` (keel.lakehouse.wap);
2. ``audit`` audits the branch and reports the result as the asset's blocking check
   ``audit``; a failed audit fails the run here, before anything reaches main, and keeps the
   branch for inspection;
3. ``publish`` fast-forwards main to the branch. When another writer published first, it
   stages the run again on main's new head, audits that and publishes it
   (``keel.lakehouse.wap.publish_or_restage``, the same engine call ``keel ingest`` makes).

The asset cannot be materialized without its audit (Dagster refuses to subset it), so
"Materialize" in the UI always runs all three. Every step claims the table's concurrency
pool: with the run queue's pools at run granularity (dagster.yaml), runs writing one table
wait for each other instead of racing to publish.

Each partition's materialization describes that partition: ``dagster/row_count`` is its row
count on main after the publish (one meaning for every table), with its preview and the
figures the table's kind adds for that day. Figures of the run as a whole (files read, rows
quarantined) are on the audit check and on the stage step.
"""

import datetime as dt
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc

from assets import single_run_backfills
from assets.metadata import audit_metadata, table_preview
from keel.lakehouse import wap
from keel.lakehouse.tables import Lakehouse, day_filter
from keel.project import Project

# Per-partition previews read at most this many days a run wrote (a backfill of years reads a month).
PREVIEW_DAYS = 31
PREVIEW_ROWS = 10


class NoConfig(dg.Config):
    """A table whose runs take no configuration."""


@dataclass(frozen=True)
class RunContext:
    """What a writer is built from in each step: the run's days, its config and the resources."""

    days: list[dt.date]
    config: dg.Config | None  # None for a table whose runs take no configuration
    resources: Any
    log: Any


@dataclass(frozen=True)
class Stage:
    """What the stage step hands on: the writer's staging, and the run's figures for the check."""

    staging: Any
    figures: dict


@dataclass(frozen=True)
class WapTable:
    """A table written through write-audit-publish, as the Dagster graph shows it.

    ``writer`` builds the engine's writer (keel.lakehouse.wap.Writer) for a run; ``run_metadata`` turns
    what its ``stage`` returned into figures of the run (computed once, in the stage step),
    ``day_metadata`` into figures of one day. ``resources`` are the resource keys the writer needs besides ``lakehouse``.
    """

    key: dg.AssetKey
    table: str
    day_column: str
    partitions_def: dg.PartitionsDefinition
    description: str
    audit_description: str
    writer: Callable[[RunContext], wap.Writer]
    group_name: str
    deps: Sequence[dg.AssetKey] = ()
    resources: frozenset[str] = frozenset()
    config: type[dg.Config] = NoConfig
    run_metadata: Callable[[Any, Lakehouse], Mapping[str, Any]] = lambda staging, lake: {}
    day_metadata: Callable[[Any, dt.date], Mapping[str, Any]] = lambda staging, day: {}
    kinds: frozenset[str] = frozenset({"iceberg", "duckdb"})
    tags: Mapping[str, str] = field(default_factory=dict)
    owners: Sequence[str] | None = None
    code_version: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    retry_policy: dg.RetryPolicy | None = None
    automation_condition: dg.AutomationCondition | None = None

    @property
    def prefix(self) -> str:
        return self.key.to_python_identifier()


def daily_partitions(project: Project) -> dg.DailyPartitionsDefinition:
    """Days from the project's declared start to yesterday (UTC)."""
    return dg.DailyPartitionsDefinition(start_date=project.start_date.isoformat(), timezone="UTC")


def run_days(context) -> list[dt.date]:
    """The days of the run's partition (range), in order."""
    window = context.partition_time_window
    first, last = window.start.date(), (window.end - dt.timedelta(days=1)).date()
    return [first + dt.timedelta(days=i) for i in range((last - first).days + 1)]


def wap_run_id(context) -> str:
    # A re-execution of a failed run keeps the branch of the run it retries.
    return context.run.root_run_id or context.run.run_id


def wap_asset(t: WapTable) -> dg.AssetsDefinition:
    """The table's asset: stage -> audit (blocking check) -> publish, one node in the graph."""
    check = dg.AssetCheckSpec("audit", asset=t.key, blocking=True, description=t.audit_description)
    check_output = check.get_python_identifier()
    resource_keys = {"lakehouse", *t.resources}
    # A config class without fields gives no schema (Dagster would read an empty class through a deprecated path).
    configured = bool(t.config.model_fields)
    shared = {
        "required_resource_keys": resource_keys,
        "pool": t.table,
        "retry_policy": t.retry_policy,
        "config_schema": t.config.to_config_schema() if configured else None,
    }

    def build(context) -> wap.Writer:
        config = t.config(**(context.op_execution_context.op_config or {})) if configured else None
        return t.writer(RunContext(run_days(context), config, context.resources, context.log))

    deps = {f"dep_{i}": key for i, key in enumerate(t.deps)}

    # The upstream assets come in as inputs that carry no data (they order, they do not load).
    @dg.op(
        name=f"{t.prefix}_stage",
        ins={name: dg.In(dg.Nothing) for name in deps},
        out=dg.Out(description="what the stage step found"),
        **shared,
    )
    def stage_step(context: dg.AssetExecutionContext):
        days = run_days(context)
        context.log.info(f"staging {t.table} for {days[0]}..{days[-1]} ({len(days)} day(s))")
        try:
            staging = build(context).stage(wap_run_id(context))
        except (ValueError, RuntimeError) as exc:
            # Bad input or a bad declaration (the engine's errors say which and the fix): retrying cannot help.
            raise dg.Failure(description=str(exc), allow_retries=False) from None
        staged = staging.staged
        context.log.info(f"staged {staged.rows:,} rows of {staged.partition} on {t.table}@{staged.branch}")
        figures = _plain(t.run_metadata(staging, context.resources.lakehouse.lakehouse()))
        return dg.Output(Stage(staging, figures), metadata={**_staged_metadata(staged), **figures})

    @dg.op(
        name=f"{t.prefix}_audit",
        out={"audited": dg.Out(dg.Nothing), check_output: dg.Out(description="the audit check")},
        **shared,
    )
    def audit_step(context: dg.AssetExecutionContext, stage: Stage):
        lake: Lakehouse = context.resources.lakehouse.lakehouse()
        staged = wap.find_staged(lake, t.table, wap_run_id(context))
        report = build(context).audit(staged)
        yield dg.AssetCheckResult(
            asset_key=t.key,
            check_name="audit",
            passed=report.success,
            severity=dg.AssetCheckSeverity.ERROR,
            description=report.summary(),
            metadata={**audit_metadata(report, staged.branch), **stage.figures},
        )
        if not report.success:
            raise dg.Failure(
                description=f"{t.table}: the audit of {staged.partition} failed, main is unchanged and branch "
                f"{staged.branch} is kept for inspection: {report.summary()}",
                allow_retries=False,
            )
        yield dg.Output(None, "audited")

    @dg.op(name=f"{t.prefix}_publish", ins={"audited": dg.In(dg.Nothing)}, out=dg.Out(dg.Nothing), **shared)
    def publish_step(context: dg.AssetExecutionContext, stage: Stage):
        lake: Lakehouse = context.resources.lakehouse.lakehouse()
        writer = build(context)
        staged = wap.find_staged(lake, t.table, wap_run_id(context))
        try:
            published = wap.publish_or_restage(lake, writer, staged)
        except wap.AuditFailed as exc:
            raise dg.Failure(
                description=str(exc), metadata=audit_metadata(exc.report, exc.staged.branch), allow_retries=False
            ) from None
        if published.restaged:
            context.log.warning(
                f"{t.table}: main moved after this run staged; staged again {published.restaged} time(s) on the new "
                "head, audited and published"
            )
        staging = published.staging or stage.staging
        rows = lake.partition_rows(t.table)
        written = set(published.staged.days)
        previews = _day_previews(lake, t, published.snapshot_id, sorted(written)[-PREVIEW_DAYS:])
        for day in run_days(context):
            meta = {
                "dagster/row_count": rows.get(day, 0),
                "table": t.table,
                "snapshot_id": str(published.snapshot_id),
                "previous_snapshot_id": str(published.previous_snapshot_id),
                # A run covers its whole partition range; a file's range can hold days it has no rows for.
                "written_by_run": day in written,
                **t.day_metadata(staging, day),
            }
            if day in previews:
                meta["preview"] = previews[day]
            context.add_asset_metadata(_plain(meta), partition_key=day.isoformat())

    def compose(**upstream):
        staged = stage_step(**upstream)
        audited, verdict = audit_step(staged)
        return {"result": publish_step(audited=audited, stage=staged), check_output: verdict}

    compose.__name__ = t.prefix
    compose.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY) for name in deps]
    )
    graph_config = None
    if configured:
        steps = [f"{t.prefix}_{step}" for step in ("stage", "audit", "publish")]
        graph_config = dg.ConfigMapping(
            config_schema=t.config.to_config_schema(), config_fn=lambda c: {s: {"config": c} for s in steps}
        )
    with single_run_backfills():
        return dg.graph_asset(
            compose,
            key=t.key,
            description=t.description,
            partitions_def=t.partitions_def,
            backfill_policy=dg.BackfillPolicy.single_run(),
            check_specs=[check],
            config=graph_config,
            group_name=t.group_name,
            kinds=set(t.kinds),
            tags=dict(t.tags),
            owners=list(t.owners) if t.owners else None,
            code_version=t.code_version,
            metadata=dict(t.metadata) or None,
            automation_condition=t.automation_condition,
            ins={name: dg.AssetIn(key=key, dagster_type=dg.Nothing) for name, key in deps.items()},
        )


def _staged_metadata(staged: wap.StagedWrite) -> dict:
    return {
        "branch": staged.branch,
        "staged_snapshot_id": str(staged.snapshot_id),
        "base_snapshot_id": str(staged.base_snapshot_id),
        "partitions": staged.partition,
        "rows_staged": staged.rows,
    }


def _day_previews(lake: Lakehouse, t: WapTable, snapshot: int, days: list[dt.date]) -> dict[dt.date, Any]:
    """Up to PREVIEW_ROWS rows of each day, from one read of main at ``snapshot``."""
    if not days:
        return {}
    data = lake.read(t.table, snapshot_id=snapshot, row_filter=day_filter(t.day_column, days))
    if not data.num_rows:
        return {}
    column = data.column(t.day_column)
    if pa.types.is_timestamp(column.type):
        # Dropping the zone keeps the UTC instant, so the date is the UTC day the partition holds.
        column = pc.cast(column, pa.timestamp(column.type.unit))
    day_of = pc.cast(column, pa.date32())
    out = {}
    for day in days:
        rows = data.filter(pc.equal(day_of, pa.scalar(day, pa.date32())))
        if rows.num_rows:
            out[day] = table_preview(rows.slice(0, PREVIEW_ROWS), rows=PREVIEW_ROWS, sort_by=t.day_column)
    return out


def _plain(metadata: Mapping[str, Any]) -> dict:
    """Metadata Dagster accepts: values it cannot take as they are go in as text."""
    out = {}
    for key, value in metadata.items():
        if isinstance(value, dt.date | dt.datetime):
            value = value.isoformat()
        out[key] = value
    return out
