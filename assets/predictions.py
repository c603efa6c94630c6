"""Batch predictions as Dagster assets: each day's active entities scored by the champion.

Per model, write-audit-publish like the feature tables: ``predictions/<name>_staged``
scores the partition's days with the version holding the alias ``champion`` and stages
them on the run's audit branch; the blocking check ``audit`` checks the branch (one row per
entity and day, predictions in range, lineage set, entities per day against recent days);
``predictions/<name>`` fast-forwards main. The job ``predict_<name>`` runs at 03:00 UTC
for the day before, after the 02:00 retrain; a range backfills as one run.
"""

import dagster as dg

from assets import single_run_backfills
from assets.metadata import audit_check_result, markdown_table, table_preview
from assets.models import champion_key
from assets.raw_events import daily_partitions, wap_run_id, window_of
from keel import wap
from keel.batch_predict import BatchPredictError, ScoredDays, audit_scores, predictions_table, stage_scores
from keel.lakehouse import day_filter
from keel.materialize import days_between
from keel.models import ModelSpec
from keel.project import Project
from keel.store import FeatureStore
from resources import LakehouseResource, MlflowResource

HOUR_OF_DAY = 3
BAR = 30  # characters of the longest histogram bar


def staged_key(spec: ModelSpec) -> dg.AssetKey:
    return dg.AssetKey(["predictions", f"{spec.name}_staged"])


def published_key(spec: ModelSpec) -> dg.AssetKey:
    return dg.AssetKey(["predictions", spec.name])


def predict_job_name(spec: ModelSpec) -> str:
    return f"predict_{spec.name}"


def prediction_assets(project: Project, spec: ModelSpec, partitions: dg.PartitionsDefinition) -> list:
    groups = list(dict.fromkeys(ref.split(".", 1)[0] for ref in spec.feature_refs(project)))
    table = predictions_table(spec)
    shared = {
        "partitions_def": partitions,
        "backfill_policy": dg.BackfillPolicy.single_run(),
        "group_name": "predictions",
        "tags": {"keel/model": spec.name, **spec.tags},
        "owners": [spec.owner] if spec.owner and "@" in spec.owner else None,
    }
    static = {"model": spec.name, "table": table, "entity": f"{spec.entity.name} {list(spec.entity.join_keys)}"}

    @dg.asset(
        key=staged_key(spec),
        deps=[champion_key(spec), *(dg.AssetKey(["features", g]) for g in groups)],
        kinds={"iceberg", "mlflow"},
        metadata=static,
        description=(
            f"Scores every entity active on the day (a row in any of {', '.join(groups)}) with the champion of "
            f"'{spec.name}', from the features as of the day's end, and stages the day on the run's audit branch "
            f"({table}@audit_<run id>) with lineage columns."
        ),
        **shared,
    )
    def staged(context: dg.AssetExecutionContext, lakehouse: LakehouseResource, mlflow: MlflowResource):
        store = FeatureStore(lakehouse.lakehouse(), project)
        days = days_between(*window_of(context))
        context.log.info(f"scoring {spec.name} for {len(days)} day(s)")
        try:
            scored = stage_scores(store, mlflow.settings(), spec, days, wap_run_id(context))
        except BatchPredictError as exc:
            raise dg.Failure(str(exc), allow_retries=False) from None
        if scored.changed_definitions:
            context.log.warning(
                f"{spec.name} v{scored.version.version} scores features whose definition changed since it was "
                f"trained: {'; '.join(scored.changed_definitions)}"
            )
        preview = store.lake.read(
            table, snapshot_id=scored.staged.snapshot_id, row_filter=day_filter("feature_ts", days[-1:]), limit=10
        )
        return dg.MaterializeResult(metadata={**static, **score_metadata(scored), "preview": table_preview(preview)})

    @dg.asset_check(
        asset=staged_key(spec),
        name="audit",
        blocking=True,
        description=(
            f"Audit of the staged predictions of '{spec.name}': one row per entity and day, predictions "
            f"{'within [0, 1]' if spec.task == 'classification' else 'set'}, lineage columns set, and entities "
            "per day against recent days."
        ),
    )
    def audit(context: dg.AssetCheckExecutionContext, lakehouse: LakehouseResource) -> dg.AssetCheckResult:
        store = FeatureStore(lakehouse.lakehouse(), project)
        stage = wap.find_staged(store.lake, table, wap_run_id(context))
        return audit_check_result(audit_scores(store, spec, stage), stage.branch)

    @dg.asset(
        key=published_key(spec),
        deps=[staged_key(spec)],
        kinds={"iceberg"},
        metadata=static,
        description=f"Daily predictions of '{spec.name}' for every active entity, with lineage ({table}).",
        **shared,
    )
    def published(context: dg.AssetExecutionContext, lakehouse: LakehouseResource):
        lake = lakehouse.lakehouse()
        stage = wap.find_staged(lake, table, wap_run_id(context))
        before = lake.head(table)
        snapshot = wap.publish(lake, stage)
        return dg.MaterializeResult(
            metadata={
                **static,
                "snapshot_id": str(snapshot),
                "previous_snapshot_id": str(before),
                "partitions": stage.partition,
                "dagster/row_count": stage.rows,
            }
        )

    return [staged, audit, published]


def score_metadata(scored: ScoredDays) -> dict:
    """What a person checks on a scoring run: which version, on what, how many, and the spread."""
    info = scored.version
    per_day = [
        [str(d), n, f"{scored.mean_prediction[d]:.4f}" if d in scored.mean_prediction else "-"]
        for d, n in scored.entities_per_day.items()
    ]
    out = {
        "model_version": info.version,
        "model_run_id": info.run_id,
        "model_uri": f"models:/{scored.model}/{info.version}",
        "branch": scored.staged.branch,
        "staged_snapshot_id": str(scored.staged.snapshot_id),
        "partitions": scored.staged.partition,
        "dagster/row_count": scored.staged.rows,
        "feature_snapshot_ids": dg.MetadataValue.json({t: str(s) for t, s in scored.snapshots.items()}),
        "entities_per_day": dg.MetadataValue.md(markdown_table(["day", "entities", "mean prediction"], per_day[-31:])),
        "definitions_changed_since_training": "; ".join(scored.changed_definitions) or "none",
    }
    if scored.deciles:
        weights = [(scored.mean_prediction[d], n) for d, n in scored.entities_per_day.items() if n]
        out["prediction_mean"] = float(sum(m * n for m, n in weights) / sum(n for _, n in weights))
        out["prediction_deciles"] = dg.MetadataValue.md(deciles_chart(scored.deciles))
    return out


def deciles_chart(deciles: list[float]) -> str:
    """The prediction deciles as a table with a bar per decile's value."""
    top = max(abs(v) for v in deciles) or 1.0
    rows = [[f"p{10 * i}", f"{v:.4f}", "█" * max(0, round(BAR * abs(v) / top))] for i, v in enumerate(deciles)]
    return markdown_table(["quantile", "prediction", ""], rows)


def prediction_definitions(project: Project, models) -> dg.Definitions:
    """Per model: the staged/audit/published prediction assets, a job and a daily 03:00 UTC schedule."""
    partitions = daily_partitions(project)
    assets, checks, jobs, schedules = [], [], [], []
    for spec in models:
        with single_run_backfills():
            staged, audit, published = prediction_assets(project, spec, partitions)
        job = dg.define_asset_job(
            predict_job_name(spec),
            selection=dg.AssetSelection.assets(staged, published),
            description=f"Score a range of days with the champion of '{spec.name}', audit and publish.",
            tags={"keel/model": spec.name},
        )
        assets += [staged, published]
        checks.append(audit)
        jobs.append(job)
        schedules.append(
            dg.build_schedule_from_partitioned_job(
                job,
                hour_of_day=HOUR_OF_DAY,
                name=f"{predict_job_name(spec)}_daily",
                description=f"Score yesterday with the champion of '{spec.name}' every day at 03:00 UTC.",
            )
        )
    return dg.Definitions(assets=assets, asset_checks=checks, jobs=jobs, schedules=schedules)
