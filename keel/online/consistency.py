"""Online/offline consistency: do the served values equal what the offline store computes?

For a sample of entities per online group, read each stored record (values and their
``feature_ts``), compute the same features point-in-time at that ``feature_ts`` from the raw
events (a training set with a spine of (entity, feature_ts)), and compare value by value:
floats within a tolerance, everything else exactly, NULL only equal to NULL.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from keel.dsl import COLUMN_TYPES, FeatureGroup
from keel.features.training_sets import OfflineStore
from keel.online.store import KEY_SEPARATOR, OnlineStore, from_us

REL_TOL = 1e-9
ABS_TOL = 1e-9


@dataclass
class GroupConsistency:
    group: str
    entities: int
    compared: int
    matched: int
    mismatches: list[dict] = field(default_factory=list)

    @property
    def match_rate(self) -> float:
        return self.matched / self.compared if self.compared else 1.0


@dataclass
class ConsistencyReport:
    groups: list[GroupConsistency]

    @property
    def compared(self) -> int:
        return sum(g.compared for g in self.groups)

    @property
    def matched(self) -> int:
        return sum(g.matched for g in self.groups)

    @property
    def match_rate(self) -> float:
        return self.matched / self.compared if self.compared else 1.0

    @property
    def mismatches(self) -> list[dict]:
        return [m for g in self.groups for m in g.mismatches]

    def summary(self) -> str:
        lines = [f"{'group':<22}{'entities':>9}{'values':>8}{'match':>9}"]
        for g in self.groups:
            lines.append(f"{g.group:<22}{g.entities:>9}{g.compared:>8}{g.match_rate:>9.2%}")
        lines.append(f"{'all':<22}{sum(g.entities for g in self.groups):>9}{self.compared:>8}{self.match_rate:>9.2%}")
        return "\n".join(lines)


def same(online, offline, rel_tol: float = REL_TOL, abs_tol: float = ABS_TOL) -> bool:
    if online is None or offline is None:
        return online is None and offline is None
    if isinstance(online, float) or isinstance(offline, float):
        if math.isnan(online) or math.isnan(offline):
            return math.isnan(online) and math.isnan(offline)
        return math.isclose(online, offline, rel_tol=rel_tol, abs_tol=abs_tol)
    return online == offline


def check_group(
    store: OfflineStore,
    online: OnlineStore,
    group: FeatureGroup,
    *,
    sample: int = 100,
    seed: int = 0,
    max_mismatches: int = 50,
) -> GroupConsistency:
    """Compare up to ``sample`` random entities' online records of ``group`` with offline values."""
    keys = online.sample(group, sample, seed)
    names = [f.name for f in group.features]
    records = online.read([(group, names)], keys)[0]
    pairs = [(k, r) for k, r in zip(keys, records, strict=True) if r is not None]
    result = GroupConsistency(group.name, len(pairs), 0, 0)
    if not pairs:
        return result
    spine = _spine(group, [k for k, _ in pairs], [r.ts for _, r in pairs])
    offline = store.get_training_set(spine, [f"{group.name}.{n}" for n in names], timestamp="feature_ts").table
    for i, (key, record) in enumerate(pairs):
        for j, name in enumerate(names):
            want = offline.column(name)[i].as_py()
            got = record.values[j]
            result.compared += 1
            if same(got, want):
                result.matched += 1
            elif len(result.mismatches) < max_mismatches:
                result.mismatches.append(
                    {
                        "group": group.name,
                        "entity": key.replace(KEY_SEPARATOR, "|"),
                        "feature_ts": from_us(record.ts).isoformat(),
                        "feature": name,
                        "online": got,
                        "offline": want,
                    }
                )
    return result


def check_consistency(
    store: OfflineStore,
    online: OnlineStore,
    groups: Sequence[FeatureGroup] | None = None,
    *,
    sample: int = 100,
    seed: int = 0,
) -> ConsistencyReport:
    """Consistency of every online group (or ``groups``) that has records in the online store."""
    chosen = [g for g in (groups or store.project.feature_groups) if g.online]
    return ConsistencyReport([check_group(store, online, g, sample=sample, seed=seed) for g in chosen])


def _spine(group: FeatureGroup, keys: list[str], stamps: list[int]) -> pa.Table:
    parts = list(zip(*(k.split(KEY_SEPARATOR) for k in keys), strict=True))
    columns = {
        name: pc.cast(pa.array(list(values)), COLUMN_TYPES[group.entity.join_keys[name]])
        for name, values in zip(group.key_columns, parts, strict=True)
    }
    columns["feature_ts"] = pa.array(stamps, pa.timestamp("us", tz="UTC"))
    return pa.table(columns)
