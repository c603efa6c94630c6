"""What the inference log holds: one record per model scored per request, and its JSON line.

Serving builds an ``InferenceRecord`` per answer (and one per challenger scored in shadow)
and hands it to ``keel.inference_log.writer.InferenceLogWriter``; ``encode`` turns it into
the line the sinks write to the topic ``TOPIC`` or the day's files, which
``keel.inference_log.loader`` loads into the table ``TABLE``.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

TABLE = "monitoring.inference_log"
TOPIC = "keel.inference_log"
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MS = dt.timedelta(milliseconds=1)


class InferenceLogError(RuntimeError):
    """The inference log cannot be written or loaded; the message says why and the fix."""


def make_log_id(request_id: str, model: str, alias: str, shadow: bool) -> str:
    """What identifies a row: a request scored by one model in one role."""
    return f"{request_id}:{model}:{alias}{':shadow' if shadow else ''}"


@dataclass(frozen=True, slots=True, kw_only=True)
class InferenceRecord:
    """One model's answer to one request, as serving saw it.

    ``features`` holds the model's input in the model's feature order; the writer reads it on
    its own thread later, so pass a dict nobody changes afterwards. ``shadow`` is True for a
    challenger scored alongside the champion whose answer was not returned; ``degraded`` is
    True when defaults replaced features because the online store was unreachable.
    """

    request_id: str
    ts: dt.datetime
    model: str
    version: int
    alias: str
    shadow: bool = False
    entity_id: str
    features: Mapping[str, float | int | str | bool | None]
    prediction: float
    latency_ms: float
    degraded: bool = False
    missing_features: Sequence[str] = ()

    @property
    def log_id(self) -> str:
        return make_log_id(self.request_id, self.model, self.alias, self.shadow)


class EncodedRecord(NamedTuple):
    """A record as the sinks write it: its UTC day, ts in epoch ms, key and JSON value."""

    day: dt.date
    ts_ms: int
    key: bytes
    value: bytes


def encode(record: InferenceRecord | Mapping[str, Any]) -> EncodedRecord:
    """The record as one line of JSON; a naive ts is taken as UTC, NaN becomes null.

    A mapping with ``InferenceRecord``'s field names stands for the record it describes.
    """
    if not isinstance(record, InferenceRecord):
        record = InferenceRecord(**record)
    ts = record.ts.replace(tzinfo=dt.UTC) if record.ts.tzinfo is None else record.ts.astimezone(dt.UTC)
    entity = str(record.entity_id)
    body = {
        "log_id": record.log_id,
        "request_id": str(record.request_id),
        "ts": ts.isoformat(),
        "model": record.model,
        "version": int(record.version),
        "alias": record.alias,
        "shadow": bool(record.shadow),
        "entity_id": entity,
        "features": dict(record.features),
        "prediction": float(record.prediction),
        "latency_ms": float(record.latency_ms),
        "degraded": bool(record.degraded),
        "missing_features": list(record.missing_features),
    }
    try:
        text = json.dumps(body, allow_nan=False, separators=(",", ":"), default=_plain)
    except ValueError:
        text = json.dumps(_finite(body), allow_nan=False, separators=(",", ":"), default=_plain)
    return EncodedRecord(ts.date(), (ts - _EPOCH) // _MS, entity.encode(), text.encode())


def _plain(value):
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    return str(value)


def _finite(value):
    if hasattr(value, "item") and not isinstance(value, dict | list):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
