"""Rebuild a registered version's training set from its recorded lineage, and retrain on it.

A version records the snapshot ids its training set read (label table included), the label
cutoff, the declared parameters, its features as ``group.feature`` and a digest of the
set's rows. ``reproduce`` reads the same snapshots with the same cutoff, so late events,
corrections and new labels landed since do not leak in, and compares digests: equal
digests mean the same rows, values and order. It retrains on the rebuilt set and reports
the metrics next to the recorded ones.

Definitions are today's: a feature group whose version or fingerprint changed since is
named in ``changed``, since it can make the set differ.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from keel.models import registry
from keel.models.registry_client import ModelRegistryError
from keel.models.spec import ModelSpec
from keel.models.training import TrainResult, train

if TYPE_CHECKING:
    from keel.config import Settings
    from keel.features.training_sets import OfflineStore

# Tags a version needs to be reproduced; versions registered before they were recorded lack them.
REQUIRED_TAGS = ("snapshot_ids", "label_cutoff", "training_set_digest", "feature_refs")


@dataclass(frozen=True)
class Reproduction:
    """A rebuilt training set compared with what a version recorded."""

    name: str
    version: int
    identical: bool
    recorded_digest: str
    digest: str
    recorded_rows: int | None
    rows: int
    snapshots: dict[str, int | None]
    label_cutoff: str
    metrics: dict[str, tuple[float | None, float]]
    changed: list[str]
    result: TrainResult

    def as_dict(self) -> dict:
        row = dataclasses.asdict(self)
        del row["result"]
        row["metrics"] = {k: {"recorded": a, "reproduced": b} for k, (a, b) in self.metrics.items()}
        return row


def recorded_spec(spec: ModelSpec, info: registry.ModelVersionInfo) -> ModelSpec:
    """The declaration as the version was trained: its features, algorithm and parameters."""
    tags = info.tags
    params = json.loads(tags.get("params", "null"))
    return dataclasses.replace(
        spec,
        features=tuple(json.loads(tags["feature_refs"])),
        algorithm=tags.get("algorithm", spec.algorithm),
        params=spec.params if params is None else params,
    )


def reproduce(store: OfflineStore, settings: Settings, spec: ModelSpec, version: int | str) -> Reproduction:
    """Rebuild ``version``'s training set from its recorded snapshots and cutoff, retrain,
    and compare with what it recorded."""
    info = registry.get_version(settings, spec.name, version)
    missing = [t for t in REQUIRED_TAGS if not info.tags.get(t)]
    if missing:
        raise ModelRegistryError(
            f"model '{spec.name}' version {info.version} lacks the lineage tag(s) {', '.join(missing)} "
            "(registered before Keel recorded them); retrain it to get a reproducible version"
        )
    replay = recorded_spec(spec, info)
    cutoff = dt.datetime.fromisoformat(info.tags["label_cutoff"])
    result = train(store, replay, as_of=info.snapshots, now=cutoff)
    digest = result.training_set.digest()
    recorded = json.loads(info.tags.get("feature_definitions", "{}"))
    now_defs = {name: f"v{g['version']}-{g['fingerprint']}" for name, g in result.training_set.groups.items()}
    changed = [
        f"{group}: trained on {was}, now {now_defs.get(group, 'absent')}"
        for group, was in sorted(recorded.items())
        if now_defs.get(group) != was
    ]
    rows = info.tags.get("training_set_rows")
    return Reproduction(
        name=spec.name,
        version=info.version,
        identical=digest == info.tags["training_set_digest"],
        recorded_digest=info.tags["training_set_digest"],
        digest=digest,
        recorded_rows=int(rows) if rows else None,
        rows=result.training_set.table.num_rows,
        snapshots=dict(info.snapshots),
        label_cutoff=info.tags["label_cutoff"],
        metrics={k: (info.metrics.get(k), float(v)) for k, v in result.metrics.items()},
        changed=changed,
        result=result,
    )
