"""What a prediction request does, without the HTTP: route, hydrate, predict, log.

Routing: with a challenger loaded and ``canary`` > 0, an entity whose id hashes below the
share is answered by the challenger, so an entity always meets the same version; in
``shadow`` mode the challenger scores the same vectors and is logged, not returned.

Hydration reads every online feature of every entity in one online-store round trip (one
Redis pipeline) through a lookup plan made once per served version. Request-time values
override hydrated ones; a feature of a group that is not online comes from the request or
its default. When the store fails or is slow, the circuit breaker counts it; while it is
open the defaults answer and the response says ``degraded``.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from keel.online.lookup import LookupPlan, key_rows, lookup, plan_lookup
from keel.online.store import OnlineStore, OnlineStoreError
from keel.project import Project
from serving.breaker import CircuitBreaker
from serving.inputs import BadInput
from serving.metrics import ServingMetrics
from serving.models import ModelSet, ServedModel, ServedVersion

log = logging.getLogger("keel.serving")

__all__ = ["BadInput", "Hydrated", "Server", "UnknownModel"]


class UnknownModel(LookupError):
    pass


@dataclass
class Hydrated:
    rows: list[list[Any]]
    degraded: bool
    online_s: float


@dataclass
class Server:
    models: ModelSet
    online: OnlineStore | None
    project: Project
    canary: float = 0.0
    shadow: bool = False
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    metrics: ServingMetrics = field(default_factory=ServingMetrics)
    inference_log: Any = None  # keel.inference_log.writer writer: .log(record), .close()
    _plans: dict = field(default_factory=dict)

    def model(self, name: str) -> ServedModel:
        served = self.models.get(name)
        if served is None:
            known = ", ".join(sorted(self.models.snapshot())) or "none"
            raise UnknownModel(f"model '{name}' is not served here (served: {known})")
        return served

    def route(self, served: ServedModel, entity: str) -> ServedVersion:
        if served.challenger is None or self.canary <= 0:
            return served.champion
        bucket = zlib.crc32(f"{served.name}/{entity}".encode()) / 2**32
        return served.challenger if bucket < self.canary else served.champion

    def predict_entities(
        self, name: str, entity_ids: Sequence[Any], request_features: dict[str, Any] | None, *, single: bool
    ) -> dict:
        t0 = time.perf_counter()
        request_id = uuid.uuid4().hex
        served = self.model(name)
        version = self.route(served, _entity_text(entity_ids[0]))
        extra = version.checked(request_features) if request_features else {}
        hydrated = self.hydrate(version, entity_ids, extra)
        filled = [version.with_defaults(row) for row in hydrated.rows]
        try:
            scores = version.score([row for row, _ in filled])
        except (TypeError, ValueError) as exc:
            raise BadInput(f"features: a value does not fit model '{name}' v{version.version}: {exc}") from None
        missing = [names for _, names in filled]
        elapsed = time.perf_counter() - t0
        latency, answered, _ = self.metrics.answered(name, version.version, version.alias)
        latency.observe(elapsed)
        answered.inc()
        for names in missing:
            for feature in names:
                self.metrics.missing.labels(name, feature).inc()
        if hydrated.degraded:
            self.metrics.degraded.labels(name).inc()
        now = dt.datetime.now(dt.UTC)
        self._log(request_id, now, version, entity_ids, hydrated.rows, scores, elapsed, hydrated.degraded, missing)
        if self.shadow and served.challenger is not None and version is served.champion:
            self._shadow(served.challenger, request_id, now, entity_ids, hydrated, extra)
        predictions = [float(s) for s in scores]
        return {
            "predictions": predictions,
            "model": name,
            "version": version.version,
            "alias": version.alias,
            "request_id": request_id,
            "missing_features": missing[0] if single else missing,
            "degraded": hydrated.degraded,
            "canary_share": self.canary if served.challenger is not None else 0.0,
            "latency_ms": round(elapsed * 1000, 3),
        }

    def hydrate(self, version: ServedVersion, entity_ids: Sequence[Any], extra: dict[str, Any]) -> Hydrated:
        """One row of raw values per entity in the version's feature order: request values,
        else online values, else None (the caller fills defaults)."""
        rows = [[extra.get(f) for f in version.features] for _ in entity_ids]
        plan, positions = self._plan(version)
        degraded, online_s = False, 0.0
        wanted = [i for i in positions if version.features[i] not in extra]
        if plan is not None and wanted and self.online is not None:
            try:
                key_rows(plan.key_columns, list(entity_ids))
            except OnlineStoreError as exc:
                raise BadInput(str(exc)) from None
            if not self.breaker.allow():
                degraded = True
            else:
                t = time.perf_counter()
                try:
                    found = lookup(self.online, plan, list(entity_ids))
                except Exception as exc:  # noqa: BLE001 - any store failure degrades, never fails the request
                    self.breaker.failure()
                    degraded = True
                    log.warning("online store read failed: %s", exc)
                else:
                    self.breaker.success()
                    for i in wanted:
                        column = found.values[version.features[i]]
                        for r in range(len(rows)):
                            rows[r][i] = column[r]
                online_s = time.perf_counter() - t
                self.metrics.answered(version.name, version.version, version.alias)[2].observe(online_s)
            self.metrics.breaker_open.set(0 if self.breaker.state == "closed" else 1)
        return Hydrated(rows, degraded, online_s)

    def infer_vectors(
        self, name: str, columns: dict[str, list[Any]], rows: int, datatypes: dict[str, str] | None = None
    ) -> dict:
        """Open Inference Protocol: the client sends the features (one tensor each, ``datatypes``
        their declared Open Inference Protocol types); the champion scores them."""
        t0 = time.perf_counter()
        served = self.model(name)
        version = served.champion
        absent = [f for f in version.features if f not in columns]
        if absent:
            raise BadInput(f"inputs: missing input tensor(s) {absent} (model '{name}' takes: {list(version.features)})")
        columns = version.checked_columns(columns, datatypes or {})
        matrix = [[columns[f][r] for f in version.features] for r in range(rows)]
        filled = [version.with_defaults(row)[0] for row in matrix]
        try:
            scores = version.score(filled)
        except (TypeError, ValueError) as exc:
            raise BadInput(f"inputs: a value does not fit model '{name}' v{version.version}: {exc}") from None
        elapsed = time.perf_counter() - t0
        latency, answered, _ = self.metrics.answered(name, version.version, version.alias)
        latency.observe(elapsed)
        answered.inc()
        return {"version": version.version, "predictions": np.asarray(scores, dtype=np.float64).tolist()}

    def _plan(self, version: ServedVersion) -> tuple[LookupPlan | None, list[int]]:
        """The lookup plan of the version's online features (made once), and their positions."""
        key = (version.name, version.version)
        if key not in self._plans:
            resolved, positions = [], []
            for i, ref in enumerate(version.refs):
                group_name, _, feature = ref.partition(".")
                group = next((g for g in self.project.feature_groups if g.name == group_name), None)
                if group is not None and group.online and feature:
                    resolved.append((group, feature))
                    positions.append(i)
            self._plans[key] = (plan_lookup(resolved) if resolved else None, positions)
        return self._plans[key]

    def _shadow(self, challenger, request_id, now, entity_ids, hydrated: Hydrated, extra) -> None:
        """Score the challenger on the champion's hydrated values; logged, never returned."""
        try:
            rows = [[extra.get(f) for f in challenger.features] for _ in entity_ids]
            if challenger.features != self.models.get(challenger.name).champion.features:
                rows = self.hydrate(challenger, entity_ids, extra).rows
            else:
                rows = hydrated.rows
            filled = [challenger.with_defaults(row) for row in rows]
            t = time.perf_counter()
            scores = challenger.score([row for row, _ in filled])
            self.metrics.shadow.labels(challenger.name, str(challenger.version)).inc()
            self._log(
                request_id,
                now,
                challenger,
                entity_ids,
                rows,
                scores,
                time.perf_counter() - t,
                hydrated.degraded,
                [m for _, m in filled],
                shadow=True,
            )
        except Exception as exc:  # noqa: BLE001 - the shadow never affects the answer
            log.warning("shadow scoring of %s failed: %s", challenger.name, exc)

    def _log(self, request_id, now, version, entity_ids, rows, scores, elapsed, degraded, missing, *, shadow=False):
        if self.inference_log is None:
            return
        for entity, row, score, names in zip(entity_ids, rows, scores, missing, strict=True):
            self.inference_log.log(
                {
                    "request_id": request_id,
                    "ts": now,
                    "model": version.name,
                    "version": version.version,
                    "alias": version.alias,
                    "shadow": shadow,
                    "entity_id": _entity_text(entity),
                    "features": dict(zip(version.features, row, strict=True)),
                    "prediction": float(score),
                    "latency_ms": elapsed * 1000,
                    "degraded": degraded,
                    "missing_features": names,
                }
            )

    def describe(self, name: str) -> dict:
        served = self.model(name)
        return {
            "name": name,
            "versions": [str(v) for v in served.versions.values()],
            "aliases": {alias: v for alias, v in served.versions.items()},
            "platform": "keel",
            "inputs": [
                {"name": spec.name, "datatype": spec.datatype, "shape": [-1]} for spec in served.champion.inputs
            ],
            "outputs": [{"name": "prediction", "datatype": "FP64", "shape": [-1]}],
        }


def _entity_text(entity: Any) -> str:
    if isinstance(entity, dict):
        return "|".join(str(entity[k]) for k in sorted(entity))
    return str(entity)
