"""Batch predictions as Dagster assets: each day's active entities scored by the champion.

Per model, one asset written through write-audit-publish like the feature tables:
``predictions/<name>`` scores the partition's days with the version holding the alias
``champion``, stages them on the run's audit branch, audits them (its blocking check ``audit``:
one row per entity and day, predictions in range, lineage set, entities per day against the
days before) and publishes them: the writer ``keel.models.batch_predict.Scoring``, the same one
``keel models score`` runs. The job ``predict_<name>`` runs at 03:00 UTC for the day before,
after the 02:00 retrain; a range backfills as one run.
"""

import dagster as dg

from assets.metadata import markdown_table
from assets.models import champion_key
from assets.write_audit_publish import RunContext, WapTable, daily_partitions, wap_asset
from keel.models.batch_predict import ScoredDays, Scoring, predictions_table
from keel.models.spec import ModelSpec
from keel.project import Project

HOUR_OF_DAY = 3
BAR = 30  # characters of the longest histogram bar


def prediction_key(spec: ModelSpec) -> dg.AssetKey:
    return dg.AssetKey(["predictions", spec.name])


def predict_job_name(spec: ModelSpec) -> str:
    return f"predict_{spec.name}"


def prediction_asset(project: Project, spec: ModelSpec, partitions: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    groups = list(dict.fromkeys(ref.split(".", 1)[0] for ref in spec.feature_refs(project)))
    table = predictions_table(spec)

    def writer(run: RunContext) -> Scoring:
        store = run.resources.lakehouse.feature_store(project)
        return Scoring(store, run.resources.mlflow.settings(), spec, tuple(run.days))

    def day_figures(scored: ScoredDays, day) -> dict:
        out = {"entities": scored.entities_per_day.get(day, 0), "model_version": scored.version.version}
        if day in scored.mean_prediction:
            out["mean_prediction"] = float(scored.mean_prediction[day])
        return out

    return wap_asset(
        WapTable(
            key=prediction_key(spec),
            table=table,
            day_column="feature_ts",
            partitions_def=partitions,
            deps=[champion_key(spec), *(dg.AssetKey(["features", g]) for g in groups)],
            resources=frozenset({"mlflow"}),
            group_name="predictions",
            kinds=frozenset({"iceberg", "mlflow"}),
            description=(
                f"Daily predictions of '{spec.name}' ({table}): every entity active on the day (a row in any of "
                f"{', '.join(groups)}) scored by the champion from its features as of the day's end, with lineage "
                "columns (model version and run, feature snapshots)."
            ),
            audit_description=(
                f"Audit of the staged predictions of '{spec.name}': one row per entity and day, predictions "
                f"{'within [0, 1]' if spec.task == 'classification' else 'set'}, lineage columns set, and entities "
                "per day against the days before. Blocks the publish."
            ),
            writer=writer,
            run_metadata=lambda scored, lake: score_metadata(scored),
            day_metadata=day_figures,
            tags={"keel/model": spec.name, **spec.tags},
            owners=[spec.owner] if spec.owner and "@" in spec.owner else None,
            metadata={"model": spec.name, "entity": f"{spec.entity.name} {list(spec.entity.join_keys)}"},
        )
    )


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
    """Per model: the predictions asset, a job and a daily 03:00 UTC schedule."""
    partitions = daily_partitions(project)
    assets, jobs, schedules = [], [], []
    for spec in models:
        asset = prediction_asset(project, spec, partitions)
        job = dg.define_asset_job(
            predict_job_name(spec),
            selection=dg.AssetSelection.assets(asset),
            description=f"Score a range of days with the champion of '{spec.name}', audit and publish.",
            tags={"keel/model": spec.name},
        )
        assets.append(asset)
        jobs.append(job)
        schedules.append(
            dg.build_schedule_from_partitioned_job(
                job,
                hour_of_day=HOUR_OF_DAY,
                name=f"{predict_job_name(spec)}_daily",
                description=f"Score yesterday with the champion of '{spec.name}' every day at 03:00 UTC.",
                default_status=dg.DefaultScheduleStatus.RUNNING,
            )
        )
    return dg.Definitions(assets=assets, jobs=jobs, schedules=schedules)
