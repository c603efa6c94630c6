"""Inference records as the serving path logs them, one or many on a day."""

import datetime as dt

from keel.inference_log.records import InferenceRecord


def record(i: int, ts: dt.datetime, **changes) -> InferenceRecord:
    values = {
        "request_id": f"req-{i}",
        "ts": ts,
        "model": "churn",
        "version": 3,
        "alias": "champion",
        "entity_id": f"u{i % 5}",
        "features": {"txn_count_7d": i, "spend_ratio": 0.5 * i, "country": "FR", "is_new": None},
        "prediction": 0.25,
        "latency_ms": 1.0 + i % 10,
        "degraded": i % 4 == 0,
        "missing_features": ["is_new"],
    }
    return InferenceRecord(**{**values, **changes})


def on_day(day: dt.date, n: int, *, start: int = 0, **changes) -> list[InferenceRecord]:
    base = dt.datetime.combine(day, dt.time(), dt.UTC)
    return [record(i, base + dt.timedelta(seconds=97 * i % 86400), **changes) for i in range(start, start + n)]
