"""Models as Dagster assets, one pair per declared model, retrained daily.

Per model: ``models/<name>_challenger`` builds the point-in-time training set, trains,
logs the run to MLflow and registers a new version as the challenger (alias ``challenger``,
stage Staging); its blocking check ``gates`` (``keel.models.gates``) holds the version back
when its hold-out metric is under the floor, a feature is NULL in every training row, or its
predictions are degenerate. ``models/<name>_champion`` compares the challenger with the champion on the
same hold-out (rebuilt from the challenger's recorded snapshots) and promotes it (alias
``champion``, stage Production) when it is better by the declared margin. The job
``train_<name>`` runs both; a schedule starts it at 02:00 UTC and sensors/retrain.py starts
it when monitoring fails. A champion changed any other way (``keel models promote``, the
MLflow UI) is recorded on ``models/<name>_champion`` by sensors/model_registry.py. Each
asset runs one step of ``keel.models.promotion`` (``train_challenger``, ``promote_challenger``).
"""

import datetime as dt
from collections.abc import Mapping, Sequence

import dagster as dg

from assets.metadata import markdown_table, shard_metadata
from keel.models import promotion
from keel.models.gates import describe_gates, metric_floor
from keel.models.reference import feature_importances
from keel.models.spec import ModelError, ModelSpec
from keel.models.training import TrainResult
from keel.project import Project
from resources import LakehouseResource, MlflowResource

TOP_IMPORTANCES = 15
RETRY = dg.RetryPolicy(max_retries=2, delay=10, backoff=dg.Backoff.EXPONENTIAL)
DAILY_AT_2 = "0 2 * * *"


class TrainConfig(dg.Config):
    """``label_cutoff``: train on the label rows timed at or before this ISO time (UTC) only, to
    train as the model would have been trained then; empty (the default) uses every label."""

    label_cutoff: str = ""

    def cutoff(self) -> dt.datetime | None:
        if not self.label_cutoff:
            return None
        try:
            moment = dt.datetime.fromisoformat(self.label_cutoff)
        except ValueError:
            raise dg.Failure(
                f"label_cutoff {self.label_cutoff!r} is not an ISO time (use e.g. '2026-03-01' or "
                "'2026-03-01T12:00:00+00:00')",
                allow_retries=False,
            ) from None
        return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def challenger_key(spec: ModelSpec) -> dg.AssetKey:
    return dg.AssetKey(["models", f"{spec.name}_challenger"])


def champion_key(spec: ModelSpec) -> dg.AssetKey:
    return dg.AssetKey(["models", f"{spec.name}_champion"])


def train_job_name(spec: ModelSpec) -> str:
    return f"train_{spec.name}"


def model_assets(project: Project, spec: ModelSpec, floor: float | None) -> tuple:
    refs = spec.feature_refs(project)
    groups = list(dict.fromkeys(ref.split(".", 1)[0] for ref in refs))
    deps = [dg.AssetKey(["features", g]) for g in groups] + [dg.AssetKey(["raw", spec.labels.name])]
    shared = {
        "group_name": "models",
        "tags": {"keel/model": spec.name, **spec.tags},
        "owners": [spec.owner] if spec.owner and "@" in spec.owner else None,
        "kinds": {"mlflow", spec.algorithm.split(":")[0]},
    }
    static = {
        "algorithm": spec.algorithm,
        "task": spec.task,
        "metric": spec.metric,
        "gate_floor": floor if floor is not None else "none",
        "min_improvement": spec.min_improvement,
        "holdout": spec.split.holdout,
        "label": f"{spec.labels.table_name}.{spec.label}",
        "features": dg.MetadataValue.json(refs),
    }

    @dg.asset(
        key=challenger_key(spec),
        deps=deps,
        metadata=static,
        retry_policy=RETRY,
        check_specs=[
            dg.AssetCheckSpec(
                "gates",
                asset=challenger_key(spec),
                blocking=True,
                description=describe_gates(spec, floor),
            )
        ],
        description=(
            f"{spec.description} Trains '{spec.name}' ({spec.algorithm}) on a point-in-time training set of "
            f"{spec.labels.table_name}, holding out the last {spec.split.holdout}, and registers the version in "
            "MLflow as the challenger (alias 'challenger', stage Staging)."
        ),
        **shared,
    )
    def challenger(
        context: dg.AssetExecutionContext, config: TrainConfig, lakehouse: LakehouseResource, mlflow: MlflowResource
    ):
        store = lakehouse.feature_store(project)
        try:
            trained = promotion.train_challenger(store, mlflow.settings(), spec, floor=floor, now=config.cutoff())
        except ModelError as exc:
            # Bad data or a bad declaration: retrying cannot help, unlike a lost connection.
            raise dg.Failure(str(exc), allow_retries=False) from None
        result, info, gates = trained.result, trained.version, trained.gates
        context.log.info(f"{spec.name}: registered version {info.version} (run {info.run_id}): {result.metrics}")
        metadata = {
            **static,
            "version": info.version,
            "run_id": info.run_id,
            "model_uri": f"models:/{spec.name}/{info.version}",
            "metrics": dg.MetadataValue.json(result.metrics),
            **{f"holdout_{k}": float(v) for k, v in result.metrics.items()},
            "train_rows": result.train_rows,
            "holdout_rows": result.holdout_rows,
            "dagster/row_count": result.train_rows + result.holdout_rows,
            "split_time": result.split_time.isoformat(),
            "snapshot_ids": dg.MetadataValue.json({k: str(v) for k, v in result.training_set.snapshots.items()}),
            "feature_count": len(result.features),
            **shard_metadata(result.training_set.shards),
        }
        importances = top_importances(result)
        if importances:
            metadata["top_importances"] = dg.MetadataValue.md(markdown_table(["feature", "importance"], importances))
        check = dg.AssetCheckResult(
            check_name="gates",
            passed=trained.passed,
            severity=dg.AssetCheckSeverity.ERROR,
            description=trained.verdict,
            metadata={"version": info.version, **{name: detail for name, (_, detail) in gates.items()}},
        )
        return dg.MaterializeResult(metadata=metadata, check_results=[check])

    @dg.asset(
        key=champion_key(spec),
        deps=[challenger_key(spec)],
        metadata=static,
        retry_policy=RETRY,
        description=(
            f"The champion of '{spec.name}': the challenger is scored with the champion on the same hold-out "
            f"and becomes champion (alias 'champion', stage Production) when better on {spec.metric} by at least "
            f"{spec.min_improvement:g} (the first version that passes the gates becomes champion). A champion "
            "changed another way (keel models promote, the MLflow UI) is recorded here by the model_registry sensor."
        ),
        **shared,
    )
    def champion(context: dg.AssetExecutionContext, lakehouse: LakehouseResource, mlflow: MlflowResource):
        store = lakehouse.feature_store(project)
        # In the train job this step runs only after 'gates' passed; run alone, it reads the verdict.
        passed, why = latest_gates(context.instance, spec)
        decision = promotion.promote_challenger(store, mlflow.settings(), spec, gates_passed=passed, gate_reason=why)
        context.log.info(f"{spec.name}: {'promoted' if decision.promoted else 'not promoted'}: {decision.reason}")
        current = decision.challenger_version if decision.promoted else decision.champion_version
        roles = decision.roles
        return dg.MaterializeResult(
            metadata={
                "promoted": "yes" if decision.promoted else "no",
                "reason": decision.reason,
                "champion_version": current if current is not None else "none",
                # How and when the champion took its role: the model_registry sensor matches them.
                "how": roles.how if roles and roles.how else "none",
                "when": roles.at if roles and roles.at else "none",
                "challenger_version": decision.challenger_version,
                "previous_champion_version": (
                    decision.champion_version if decision.champion_version is not None else "none"
                ),
                f"challenger_{spec.metric}": _number(decision.challenger_metric),
                f"champion_{spec.metric}": _number(decision.champion_metric),
                "comparison_rows": decision.holdout_rows,
            }
        )

    return challenger, champion


def latest_gates(instance: dg.DagsterInstance, spec: ModelSpec) -> tuple[bool, str]:
    """Whether the latest 'gates' evaluation of the challenger passed, and its description."""
    key = dg.AssetCheckKey(challenger_key(spec), "gates")
    record = instance.event_log_storage.get_latest_asset_check_execution_by_key([key]).get(key)
    evaluation = record.event.dagster_event.event_specific_data if record and record.event else None
    if not isinstance(evaluation, dg.AssetCheckEvaluation):
        return False, "the challenger has no completed 'gates' evaluation; run the train job"
    return evaluation.passed, evaluation.description or ""


def top_importances(result: TrainResult, n: int = TOP_IMPORTANCES) -> list[list]:
    """The model's largest feature importances, when it has one per input feature."""
    values = feature_importances(result.model, list(result.features))
    ranked = sorted(values.items(), key=lambda item: -item[1])[:n]
    return [[name, f"{value:.4f}"] for name, value in ranked]


def _number(value: float | None):
    return float(value) if value is not None else "none"


def model_definitions(
    project: Project, models: Sequence[ModelSpec], *, floors: Mapping[str, float] | None = None
) -> dg.Definitions:
    """Training, gating and promotion assets, a train job and a daily 02:00 UTC schedule per model.

    ``floors``: the gate's metric floor per model name (default: keel.models.gates.DEFAULT_FLOORS by metric).
    """
    assets, jobs, schedules = [], [], []
    for spec in models:
        challenger, champion = model_assets(project, spec, metric_floor(spec, floors))
        job = dg.define_asset_job(
            train_job_name(spec),
            selection=dg.AssetSelection.assets(challenger, champion),
            description=f"Train '{spec.name}', gate it and promote it when it beats the champion.",
            tags={"keel/model": spec.name},
        )
        assets += [challenger, champion]
        jobs.append(job)
        schedules.append(
            dg.ScheduleDefinition(
                name=f"{train_job_name(spec)}_daily",
                job=job,
                cron_schedule=DAILY_AT_2,
                execution_timezone="UTC",
                description=f"Retrain '{spec.name}' every day at 02:00 UTC.",
                default_status=dg.DefaultScheduleStatus.RUNNING,
            )
        )
    return dg.Definitions(assets=assets, jobs=jobs, schedules=schedules)
