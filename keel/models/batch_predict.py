"""Batch prediction: a model's champion scores every active entity, one day at a time.

Day D's rows of ``predictions.<model>`` hold, for every entity with a row on D in any of
the model's feature tables (the feature store's active entities that day), the champion's
prediction from the features as of D's end (``feature_ts`` = D 23:59:59.999999 UTC), read
from ``features.<group>`` at snapshots pinned once per run. Each row carries its lineage:
the model name, version and MLflow run, the feature tables' snapshot ids, the scoring run
and the number of features that were NULL.

Days land through write-audit-publish like the feature tables: ``stage_scores`` writes
whole days to the run's audit branch (a rerun replaces them, never duplicates them),
``audit_scores`` checks the branch (one row per entity and day, predictions in range,
lineage set, entities per day against recent days), and ``wap.publish`` moves main.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from keel.dsl import Column, EventSource
from keel.features.materialize import HISTORY_PARTITIONS, day_end
from keel.lakehouse import wap
from keel.lakehouse.audit import AuditReport, audit_events
from keel.lakehouse.tables import day_filter
from keel.models import registry
from keel.models.role_types import CHAMPION
from keel.models.spec import ModelSpec, resolve_refs
from keel.models.training import predict

if TYPE_CHECKING:
    from keel.config import Settings
    from keel.features.training_sets import OfflineStore

NAMESPACE = "predictions"
DAYS_PER_CHUNK = 7  # days scored per chunk: bounds memory on long backfills


class BatchPredictError(ValueError):
    """A day cannot be scored; the message says what is missing and how to fix it."""


def prediction_declaration(spec: ModelSpec) -> EventSource:
    """The predictions table described as a source, so the source audit checks it."""
    bounded = {"min": 0.0, "max": 1.0} if spec.task == "classification" else {}
    return EventSource(
        name=spec.name,
        entity=spec.entity,
        namespace=NAMESPACE,
        timestamp="feature_ts",
        event_id="prediction_id",
        description=f"Daily predictions of model '{spec.name}' for every active entity, with lineage.",
        columns=(
            Column("prediction", "float64", nullable=False, **bounded),
            Column("model_name", "string", nullable=False, allowed=(spec.name,)),
            Column("model_version", "int64", nullable=False, min=1),
            Column("model_run_id", "string", nullable=False),
            Column("feature_snapshot_ids", "string", nullable=False),
            Column("missing_features", "int64", nullable=False, min=0),
            Column("run_id", "string", nullable=False),
            Column("scored_at", "timestamp", nullable=False),
        ),
    )


def predictions_table(spec: ModelSpec) -> str:
    return prediction_declaration(spec).table_name


@dataclass(frozen=True)
class ScoredDays:
    """Days scored and staged on the run's audit branch."""

    model: str
    staged: wap.StagedWrite
    version: registry.ModelVersionInfo
    snapshots: dict[str, int | None]
    entities_per_day: dict[dt.date, int]
    mean_prediction: dict[dt.date, float]
    deciles: list[float]
    changed_definitions: list[str] = field(default_factory=list)


def stage_scores(
    store: OfflineStore,
    settings: Settings,
    spec: ModelSpec,
    days: Sequence[dt.date],
    run_id: str,
    *,
    alias: str = CHAMPION,
) -> ScoredDays:
    """Score ``days`` with the version holding ``alias`` and stage them on the run's audit branch."""
    days = sorted(set(days))
    if not days:
        raise BatchPredictError(f"model '{spec.name}': no days to score; give at least one day")
    model, features, info = registry.load_model(settings, spec.name, alias)
    refs = resolve_refs(store.project, spec, json.loads(info.tags.get("feature_refs") or "null") or features)
    by_group: dict[str, list[str]] = {}
    for ref in refs:
        group, name = ref.split(".", 1)
        by_group.setdefault(group, []).append(name)
    lake = store.lake
    tables = {g: store.project.group(g).table_name for g in by_group}
    absent = [t for t in tables.values() if not lake.exists(t)]
    if absent:
        raise BatchPredictError(
            f"model '{spec.name}': feature table(s) {', '.join(absent)} do not exist yet; "
            "materialize the feature groups first (keel backfill GROUP --start --end)"
        )
    # One snapshot per table for the whole run: every chunk reads the same features.
    snapshots = {t: lake.head(t) for t in tables.values()}
    covered: set = set()
    for table, snapshot in snapshots.items():
        covered |= {d for d, rows in lake.partition_rows(table, snapshot_id=snapshot).items() if rows}
    bare = [d for d in days if d not in covered]
    if bare:
        shown = ", ".join(map(str, bare[:5])) + (f" and {len(bare) - 5} more" if len(bare) > 5 else "")
        raise BatchPredictError(
            f"model '{spec.name}': no feature rows on {shown} in {', '.join(sorted(tables.values()))}; "
            "materialize those days of the feature groups first (keel backfill GROUP --start --end)"
        )
    entities: dict[dt.date, int] = {}
    means: dict[dt.date, float] = {}
    predictions: list[np.ndarray] = []
    lineage = {
        "model_name": spec.name,
        "model_version": info.version,
        "model_run_id": info.run_id,
        "feature_snapshot_ids": json.dumps({t: s for t, s in sorted(snapshots.items())}),
        "run_id": run_id,
        "scored_at": dt.datetime.now(dt.UTC),
    }
    declaration = prediction_declaration(spec)

    def chunks() -> Iterator[pa.Table]:
        for i in range(0, len(days), DAYS_PER_CHUNK):
            chunk_days = days[i : i + DAYS_PER_CHUNK]
            frame = _feature_rows(store, spec, by_group, tables, snapshots, chunk_days)
            scores = predict(model, spec, frame, features)
            missing = np.zeros(frame.num_rows, dtype=np.int64)
            for name in features:
                missing += pc.is_null(frame.column(name)).to_numpy(zero_copy_only=False)
            out = _with_lineage(frame, spec, declaration, scores, missing, lineage)
            for day in chunk_days:
                on_day = _on_day(out, day)
                entities[day] = int(on_day.sum())
                if entities[day]:
                    means[day] = float(scores[on_day].mean())
            predictions.append(scores)
            yield out

    lake.ensure_table(declaration.table_name, declaration.arrow_schema(), day_column="feature_ts")
    staged = wap.stage(
        lake,
        declaration.table_name,
        chunks(),
        run_id=run_id,
        source=f"model:{spec.name}",
        day_column="feature_ts",
        mode="replace",
        days=days,
        properties={
            "keel.model": spec.name,
            "keel.model_version": str(info.version),
            "keel.inputs": ",".join(f"{t}@{s}" for t, s in sorted(snapshots.items())),
        },
    )
    all_scores = np.concatenate(predictions) if predictions else np.empty(0)
    deciles = np.quantile(all_scores, np.linspace(0, 1, 11)).tolist() if all_scores.size else []
    return ScoredDays(
        model=spec.name,
        staged=staged,
        version=info,
        snapshots=snapshots,
        entities_per_day=entities,
        mean_prediction=means,
        deciles=deciles,
        changed_definitions=_changed_definitions(store, info),
    )


def audit_scores(store: OfflineStore, spec: ModelSpec, staged: wap.StagedWrite) -> AuditReport:
    """The staged days, audited: one row per entity and day, predictions in range, lineage
    set, and entities per day within range of main's recent days."""
    lake = store.lake
    name = predictions_table(spec)
    recent = wap.recent_partition_rows(lake, name, staged.days, HISTORY_PARTITIONS)
    data = lake.read(name, snapshot_id=staged.snapshot_id, row_filter=day_filter("feature_ts", staged.days))
    return audit_events(data, prediction_declaration(spec), recent_partition_rows=recent)


@dataclass(frozen=True)
class Scoring:
    """The write-audit-publish writer of a model's batch predictions for some days: what
    ``keel models score`` and the Dagster asset ``predictions/<model>`` both run."""

    store: OfflineStore
    settings: Settings
    spec: ModelSpec
    days: tuple[dt.date, ...]

    @property
    def table(self) -> str:
        return predictions_table(self.spec)

    def stage(self, run_id: str) -> ScoredDays:
        return stage_scores(self.store, self.settings, self.spec, self.days, run_id)

    def audit(self, staged: wap.StagedWrite) -> AuditReport:
        return audit_scores(self.store, self.spec, staged)


def score_days(
    store: OfflineStore, settings: Settings, spec: ModelSpec, days: Sequence[dt.date], run_id: str
) -> tuple[ScoredDays, AuditReport, int | None]:
    """Score, audit and publish ``days``: the write, its audit and main's new snapshot (None: not published)."""
    writer = Scoring(store, settings, spec, tuple(days))
    scored = writer.stage(run_id)
    report = writer.audit(scored.staged)
    if not report.success:
        return scored, report, None
    try:
        return scored, report, wap.publish_or_restage(store.lake, writer, scored.staged).snapshot_id
    except wap.AuditFailed as exc:
        return scored, exc.report, None


def _feature_rows(
    store: OfflineStore,
    spec: ModelSpec,
    by_group: dict[str, list[str]],
    tables: dict[str, str],
    snapshots: dict[str, int | None],
    days: Sequence[dt.date],
) -> pa.Table:
    """Keys, feature_ts and the model's features for every entity with a row on ``days`` in
    any of the groups' tables, ordered by day and key."""
    keys = list(spec.entity.join_keys)
    on = ", ".join(f'"{k}"' for k in keys) + ", feature_ts"
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    try:
        for i, (group, names) in enumerate(by_group.items()):
            data = store.lake.read(
                tables[group],
                snapshot_id=snapshots[tables[group]],
                row_filter=day_filter("feature_ts", days),
                columns=[*keys, "feature_ts", *names],
            )
            con.register(f"g{i}", data)
        active = " UNION ".join(f"SELECT {on} FROM g{i}" for i in range(len(by_group)))
        joins = " ".join(f"LEFT JOIN g{i} USING ({on})" for i in range(len(by_group)))
        values = ", ".join(f'g{i}."{name}"' for i, names in enumerate(by_group.values()) for name in names)
        head = ", ".join(f'a."{k}"' for k in keys) + ", a.feature_ts"
        frame = con.sql(
            f"SELECT {head}, {values} FROM ({active}) a {joins} ORDER BY a.feature_ts, {head}"
        ).to_arrow_table()
    finally:
        con.close()
    expected = {day_end(d) for d in days}
    if frame.num_rows and not set(pc.unique(frame.column("feature_ts")).to_pylist()) <= expected:
        raise BatchPredictError(f"model '{spec.name}': feature rows are not timed at day ends; rebuild the tables")
    return frame


def _with_lineage(
    frame: pa.Table,
    spec: ModelSpec,
    declaration: EventSource,
    scores: np.ndarray,
    missing: np.ndarray,
    lineage: dict,
) -> pa.Table:
    keys = list(spec.entity.join_keys)
    n = frame.num_rows
    key_text = pc.binary_join_element_wise(*[pc.cast(frame.column(k), pa.string()) for k in keys], "|")
    day_text = pc.strftime(frame.column("feature_ts"), format="%Y-%m-%d")
    columns = {
        "prediction_id": pc.binary_join_element_wise(key_text, day_text, "@"),
        **{k: frame.column(k) for k in keys},
        "feature_ts": frame.column("feature_ts"),
        "prediction": pa.array(scores, pa.float64()),
        "missing_features": pa.array(missing, pa.int64()),
        **{name: pa.array([value] * n) for name, value in lineage.items()},
    }
    schema = declaration.arrow_schema()
    return pa.table({f.name: pc.cast(columns[f.name], f.type) for f in schema}, schema=schema)


def _on_day(table: pa.Table, day: dt.date) -> np.ndarray:
    return pc.equal(table.column("feature_ts"), pa.scalar(day_end(day), pa.timestamp("us", tz="UTC"))).to_numpy(
        zero_copy_only=False
    )


def _changed_definitions(store: OfflineStore, info: registry.ModelVersionInfo) -> list[str]:
    """Groups whose definition changed since the version was trained: their tables may now
    hold values the model never saw in training."""
    recorded = json.loads(info.tags.get("feature_definitions") or "{}")
    out = []
    for name, was in sorted(recorded.items()):
        group = next((g for g in store.project.feature_groups if g.name == name), None)
        now = f"v{group.version}-{group.fingerprint()}" if group else "absent"
        if now != was:
            out.append(f"{name}: trained on {was}, now {now}")
    return out
