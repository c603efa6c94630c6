"""Replayed traffic: what the serving process would have logged on past days.

Monitoring needs traffic over time, and a new deployment, a backtest or the demo has only
history. ``replay`` draws, for each day, requests from the entities active that day (a row
in one of the model's feature tables that have a TTL, which hold an entity only while its
values are fresh), each at a random moment of the day, computes their features as of that
moment with the offline engine (the values the online store held then: the same
definitions give the same values, see ``keel consistency``), scores them with a registered
version natively and writes the answers to the inference log as serving would, with the
request time as ``ts`` and a latency of 0. Request ids start with ``replay-<model>-v<version>``,
so replayed rows are never taken for live ones, and replaying the same days with the same
version and seed writes the same records again, which the loader keeps once.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from keel.config import Settings
from keel.features.training_sets import OfflineStore
from keel.inference_log.writer import InferenceLogWriter
from keel.lakehouse.tables import day_filter
from keel.models import registry
from keel.models.role_types import CHAMPION
from keel.models.spec import ModelSpec, resolve_refs
from keel.models.training import predict

DAY = dt.timedelta(days=1)


class ReplayError(ValueError):
    """Traffic cannot be replayed; the message names the model, the day and the fix."""


@dataclass
class ReplayResult:
    model: str
    version: int
    alias: str
    per_day: dict[dt.date, int] = field(default_factory=dict)
    mean_prediction: dict[dt.date, float] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def rows(self) -> int:
        return sum(self.per_day.values())


def replay(
    store: OfflineStore,
    settings: Settings,
    spec: ModelSpec,
    days: Sequence[dt.date],
    *,
    per_day: int = 200,
    alias: str = CHAMPION,
    seed: int = 0,
    writer: InferenceLogWriter | None = None,
) -> ReplayResult:
    """Score ``per_day`` active entities per day at random moments and log the answers."""
    if per_day < 1:
        raise ReplayError(f"replay of model {spec.name!r}: per_day={per_day} must be at least 1")
    t0 = time.perf_counter()
    model, features, info = registry.load_model(settings, spec.name, alias)
    refs = resolve_refs(store.project, spec, features)
    out = ReplayResult(spec.name, info.version, alias)
    own = writer is None
    writer = writer or InferenceLogWriter.from_settings(settings)
    try:
        out.per_day = dict.fromkeys(sorted(days), 0)
        spines = [s for s in (_requests(store, spec, refs, day, per_day, seed) for day in sorted(days)) if s.num_rows]
        if spines:
            # One point-in-time computation for every day: the engine reads each raw table once.
            values = store.get_training_set(pa.concat_tables(spines), refs, timestamp="ts").table
            scores = np.asarray(predict(model, spec, values, features), dtype=np.float64)
            _log(writer, spec, info.version, alias, values, features, scores)
            request_days = np.array([t.date() for t in values.column("ts").to_pylist()])
            for day in sorted(set(request_days)):
                picked = request_days == day
                out.per_day[day] = int(picked.sum())
                out.mean_prediction[day] = float(scores[picked].mean())
    finally:
        if own:
            writer.close()
    out.seconds = time.perf_counter() - t0
    return out


def _requests(store: OfflineStore, spec: ModelSpec, refs: list[str], day: dt.date, n: int, seed: int) -> pa.Table:
    """``n`` requests on ``day``: entities drawn (with replacement, as a user may be scored several
    times a day) from those active that day, each at a random moment of the day, by time."""
    keys = list(spec.entity.join_keys)
    active = set()
    for table in _population_tables(store, spec, refs):
        if not store.lake.exists(table):
            raise ReplayError(
                f"replay of model {spec.name!r}: feature table {table!r} does not exist; compute it first"
            )
        rows = store.lake.read(table, row_filter=day_filter("feature_ts", [day]), columns=keys)
        active.update(zip(*(rows.column(k).to_pylist() for k in keys), strict=True))
    if not active:
        return pa.table({"ts": pa.array([], pa.timestamp("us", "UTC"))})
    rng = np.random.default_rng([seed, day.toordinal()])
    chosen = sorted(active)
    picked = rng.integers(0, len(chosen), size=n)
    start = dt.datetime.combine(day, dt.time(), dt.UTC)
    offsets = np.sort(rng.integers(0, DAY // dt.timedelta(microseconds=1), size=n))
    types = {"string": pa.string(), "int64": pa.int64()}
    return pa.table(
        {
            **{
                k: pa.array([chosen[i][j] for i in picked], types[spec.entity.join_keys[k]]) for j, k in enumerate(keys)
            },
            "ts": pa.array([start + dt.timedelta(microseconds=int(o)) for o in offsets], pa.timestamp("us", "UTC")),
        }
    )


def _population_tables(store: OfflineStore, spec: ModelSpec, refs: list[str]) -> list[str]:
    """The feature tables whose rows say who is active: those of groups with a TTL (a row only
    while the entity's values are fresh), else all of the model's."""
    groups = [store.project.group(g) for g in dict.fromkeys(ref.split(".", 1)[0] for ref in refs)]
    fresh = [g for g in groups if g.ttl]
    return [g.table_name for g in (fresh or groups)]


def _log(writer, spec, version, alias, values: pa.Table, features, scores) -> None:
    keys = sorted(spec.entity.join_keys)
    columns = {name: values.column(name).to_pylist() for name in features}
    key_values = [values.column(k).to_pylist() for k in keys]
    times = values.column("ts").to_pylist()
    for i, score in enumerate(np.asarray(scores, dtype=np.float64)):
        row = {name: _plain(columns[name][i]) for name in features}
        writer.log(
            {
                "request_id": f"replay-{spec.name}-v{version}-{times[i]:%Y%m%d}-{i:07d}",
                "ts": times[i],
                "model": spec.name,
                "version": version,
                "alias": alias,
                "entity_id": "|".join(str(v[i]) for v in key_values),
                "features": row,
                "prediction": float(score),
                # No request was served: serving's latency has no meaning here, and a replay
                # repeated with the same seed must write the very same records (kept once).
                "latency_ms": 0.0,
                "missing_features": [name for name, value in row.items() if value is None],
            }
        )


def _plain(value):
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return value


def summary(result: ReplayResult) -> str:
    days = sorted(result.per_day)
    if not days:
        return f"{result.model}: nothing replayed"
    return (
        f"{result.model} v{result.version} ({result.alias}): {result.rows:,} answers over {len(days)} day(s) "
        f"{days[0]}..{days[-1]} in {result.seconds:.1f}s"
    )


def as_json(result: ReplayResult) -> str:
    return json.dumps(
        {
            "model": result.model,
            "version": result.version,
            "alias": result.alias,
            "rows": result.rows,
            "per_day": {str(d): n for d, n in result.per_day.items()},
            "mean_prediction": {str(d): v for d, v in result.mean_prediction.items()},
        }
    )
