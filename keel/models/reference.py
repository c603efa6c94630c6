"""The reference sample a model version is monitored against, logged with the version.

Drift statistics such as Kolmogorov-Smirnov and Wasserstein need the reference values, not a
histogram, so training logs ``reference.parquet`` next to ``baseline.json``: up to
``MAX_ROWS`` rows of the training set drawn uniformly with a fixed seed, each with its
feature values (the training set's own types), the label, the label time, the side of the
split it fell on and the model's score. Monitoring compares live features with all rows,
and live scores with the hold-out rows' scores only: in-sample scores are sharper than
anything the model will produce on new data.

Feature importances (one per input feature, when the estimator has them) go into
``importances.json``; drift weighted by importance reads them.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from keel.models.registry_client import mlflow_client
from keel.models.training import predict

if TYPE_CHECKING:
    from keel.config import Settings
    from keel.models.spec import ModelSpec
    from keel.models.training import TrainResult

REFERENCE_ARTIFACT = "reference.parquet"
IMPORTANCES_ARTIFACT = "importances.json"
MAX_ROWS = 50_000
SEED = 0
# Columns of the sample beside the features; the prefix keeps them apart from feature names.
LABEL, LABEL_TS, SPLIT, PREDICTION = "__label", "__label_ts", "__split", "__prediction"
TRAIN, HOLDOUT = "train", "holdout"


class ReferenceSampleError(LookupError):
    """A version has no reference sample, or the sample does not fit; the message says the fix."""


def reference_sample(spec: ModelSpec, result: TrainResult, *, max_rows: int = MAX_ROWS, seed: int = SEED) -> pa.Table:
    """The training set's rows (a fixed-seed sample past ``max_rows``) with label, split and score."""
    table = result.training_set.table
    features = list(result.features)
    ts = spec.labels.timestamp
    if ts not in table.column_names:
        raise ReferenceSampleError(
            f"model {spec.name!r}: the training set has no label time column {ts!r} "
            f"(columns: {', '.join(table.column_names)}); build it with keel.models.training.train, which keeps it"
        )
    times = table.column(ts)
    cut = pa.scalar(result.split_time, times.type)
    mask = pc.greater(times, cut).to_numpy(zero_copy_only=False).astype(bool)
    scores = predict(result.model, spec, table, features)
    sample = pa.table(
        {
            **{name: table.column(name) for name in features},
            LABEL: table.column(spec.label),
            LABEL_TS: times,
            SPLIT: pa.array(np.where(mask, HOLDOUT, TRAIN)),
            PREDICTION: pa.array(np.asarray(scores, dtype=np.float64)),
        }
    )
    if sample.num_rows > max_rows:
        rows = np.sort(np.random.default_rng(seed).choice(sample.num_rows, size=max_rows, replace=False))
        sample = sample.take(pa.array(rows))
    return sample


def feature_importances(model: Any, features: list[str]) -> dict[str, float]:
    """One importance per input feature, normalised to sum to 1; empty when the estimator has none."""
    estimator = model.steps[-1][1] if hasattr(model, "steps") else model
    values = getattr(estimator, "feature_importances_", None)
    if values is None or len(values) != len(features):
        return {}
    values = np.clip(np.asarray(values, dtype=np.float64), 0.0, None)
    total = float(values.sum())
    if not total > 0:
        return {}
    return {name: float(v / total) for name, v in zip(features, values, strict=True)}


def log_reference(spec: ModelSpec, result: TrainResult) -> None:
    """Log the sample and the importances to the active MLflow run."""
    import mlflow

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / REFERENCE_ARTIFACT
        pq.write_table(reference_sample(spec, result), path)
        mlflow.log_artifact(str(path))
    mlflow.log_dict(feature_importances(result.model, list(result.features)), IMPORTANCES_ARTIFACT)


def load_reference(settings: Settings, model: str, version: int, run_id: str) -> pa.Table:
    """The sample version ``version`` of ``model`` logged at training."""
    # MLflow draws a progress bar per download; in a batch job's log it is noise.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    client = mlflow_client(settings)
    with tempfile.TemporaryDirectory() as folder:
        try:
            path = client.download_artifacts(run_id, REFERENCE_ARTIFACT, folder)
        except Exception as exc:  # MLflow raises several types for a missing artifact
            raise ReferenceSampleError(
                f"model {model!r} v{version} (run {run_id}) has no {REFERENCE_ARTIFACT} to monitor against "
                f"({type(exc).__name__}); it was trained before monitoring existed: retrain it "
                f"(the train_{model} job) and promote the new version"
            ) from None
        return pq.read_table(path)


def load_importances(settings: Settings, run_id: str) -> dict[str, float]:
    """The importances a version logged; empty when it logged none."""
    client = mlflow_client(settings)
    with tempfile.TemporaryDirectory() as folder:
        try:
            path = client.download_artifacts(run_id, IMPORTANCES_ARTIFACT, folder)
        except Exception:  # noqa: BLE001 - a version without importances is weighted evenly
            return {}
        with open(path, encoding="utf-8") as handle:
            return {str(k): float(v) for k, v in json.load(handle).items()}
