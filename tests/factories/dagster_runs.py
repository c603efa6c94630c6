"""Running the raw event ingest and the model training jobs in process: the landing files the
ingest reads, and the audit check's evaluation a run reports."""

import csv
import datetime as dt

import dagster as dg

from assets.models import model_definitions
from assets.raw_events import ingest_run_config
from keel.dsl import Entity
from resources import resource_definitions
from sensors.landing import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG
from tests.factories.payments import payments_source

START = dt.date(2026, 1, 1)
PAYMENTS = payments_source(Entity(name="buyer", join_keys={"user_id": "string"}))


def write_csv(path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: v.isoformat() if isinstance(v, dt.datetime) else v for k, v in row.items()})
    return str(path)


def run_ingest(defs, instance, files: list[str], first: dt.date, last: dt.date, **kwargs) -> dg.ExecuteInProcessResult:
    job = defs.resolve_job_def(ingest_job_name_for(defs))
    return job.execute_in_process(
        instance=instance,
        run_config=ingest_run_config(PAYMENTS, files),
        tags={ASSET_PARTITION_RANGE_START_TAG: first.isoformat(), ASSET_PARTITION_RANGE_END_TAG: last.isoformat()},
        raise_on_error=False,
        **kwargs,
    )


def ingest_job_name_for(defs) -> str:
    names = [job.name for job in defs.jobs if job.name.startswith("ingest_")]
    assert names == ["ingest_payments"]
    return names[0]


def check_evaluation(result: dg.ExecuteInProcessResult):
    evaluations = [e.event_specific_data for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
    assert len(evaluations) == 1
    return evaluations[0]


def run_train(project, settings, instance, model, floors=None):
    defs = dg.Definitions.merge(model_definitions(project, [model], floors=floors), resource_definitions(settings))
    return defs.resolve_job_def("train_churn").execute_in_process(instance=instance, raise_on_error=False)
