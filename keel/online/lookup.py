"""Online lookups: many features of many entities in the order asked, with age and status.

A ``LookupPlan`` resolves the requested features once (which group reads which fields, how
each value decodes, each group's TTL); ``lookup`` then makes one read of the online store
(one pipelined round trip on Redis) and marks each value ``present``, ``null``, ``missing``
or ``expired``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa

from keel.dsl import FeatureGroup
from keel.online.store import (
    EXPIRED,
    MISSING,
    NULL,
    PRESENT,
    OnlineStore,
    OnlineStoreError,
    Read,
    entity_key,
    to_us,
    ttl_us,
    wall_clock_us,
)


@dataclass
class OnlineFeatures:
    """Online values of some features for some entities, columns in the order asked.

    Per feature and entity: the value, its age in seconds (now - feature_ts) and a status:
    ``present``; ``null`` (stored, and NULL); ``missing`` (no record for the entity);
    ``expired`` (older than the group's TTL: the value reads as None).
    """

    keys: dict[str, list]
    features: list[str]
    values: dict[str, list]
    age_s: dict[str, list]
    status: dict[str, list]

    def __len__(self) -> int:
        return len(next(iter(self.keys.values()), []))

    def to_dict(self) -> dict[str, list]:
        """Key columns, then the features in the order asked."""
        return {**self.keys, **self.values}

    def to_table(self, *, with_status: bool = False) -> pa.Table:
        columns = self.to_dict()
        if with_status:
            for name in self.features:
                columns[f"{name}__age_s"] = self.age_s[name]
                columns[f"{name}__status"] = self.status[name]
        return pa.table(columns)

    def rows(self) -> list[dict]:
        """One dict per entity: its keys and ``features``, ``age_s`` and ``status`` by feature name."""
        return [
            {
                **{k: v[i] for k, v in self.keys.items()},
                "features": {f: self.values[f][i] for f in self.features},
                "age_s": {f: self.age_s[f][i] for f in self.features},
                "status": {f: self.status[f][i] for f in self.features},
            }
            for i in range(len(self))
        ]


@dataclass(frozen=True)
class LookupPlan:
    """Resolved features: which group reads which names, and the output names in order."""

    key_columns: list[str]
    requests: list[tuple[FeatureGroup, list[str]]]
    outputs: list[str]
    reads: list[Read]
    ttls: list[int | None]


def plan_lookup(resolved: Sequence[tuple[FeatureGroup, str]]) -> LookupPlan:
    """A plan for resolved (group, feature) pairs, all of one entity and all from online groups."""
    groups: dict[str, tuple[FeatureGroup, list[str]]] = {}
    for group, name in resolved:
        if not group.online:
            raise OnlineStoreError(
                f"feature group {group.name!r} is not served online; declare it with online=True "
                "(then materialize and sync it) or read it offline with get_training_set"
            )
        groups.setdefault(group.name, (group, []))[1].append(name)
    first = resolved[0][0]
    for group, _ in groups.values():
        if group.key_columns != first.key_columns:
            raise OnlineStoreError(
                f"features of entity {first.entity.name!r} and {group.entity.name!r} cannot be looked up together; "
                "ask once per entity"
            )
    requests = list(groups.values())
    return LookupPlan(
        list(first.key_columns),
        requests,
        [name for _, name in resolved],
        [Read.of(g, names) for g, names in requests],
        [ttl_us(g) for g, _ in requests],
    )


def lookup(
    online: OnlineStore, plan: LookupPlan, entity_ids: Sequence, *, now: dt.datetime | None = None
) -> OnlineFeatures:
    """Read the plan's features for ``entity_ids``: key values, or dicts / tuples of them for composite keys."""
    entities = key_rows(plan.key_columns, entity_ids)
    keys = [entity_key(k) for k in entities]
    raw = online._read(plan.reads, keys)  # noqa: SLF001 - the plan carries the prepared reads
    now_us = to_us(now) if now is not None else wall_clock_us()
    values: dict[str, list] = {}
    ages: dict[str, list] = {}
    statuses: dict[str, list] = {}
    for read, ttl, recs in zip(plan.reads, plan.ttls, raw, strict=True):
        age = [None if r is None else (now_us - r[0]) / 1e6 for r in recs]
        # Per entity: decoded values, or a status for all of them (missing / expired).
        rows = [
            MISSING if r is None else EXPIRED if ttl is not None and r[0] + ttl < now_us else read.decode(r[1])
            for r in recs
        ]
        for j, name in enumerate(read.features):
            vals, stat = [], []
            for row in rows:
                if isinstance(row, str):
                    vals.append(None)
                    stat.append(row)
                else:
                    v = row[j]
                    vals.append(v)
                    stat.append(NULL if v is None else PRESENT)
            values[name], ages[name], statuses[name] = vals, age, stat
    return OnlineFeatures(
        keys={k: [entity[i] for entity in entities] for i, k in enumerate(plan.key_columns)},
        features=list(plan.outputs),
        values={n: values[n] for n in plan.outputs},
        age_s={n: ages[n] for n in plan.outputs},
        status={n: statuses[n] for n in plan.outputs},
    )


def key_rows(key_columns: list[str], entity_ids: Sequence) -> list[tuple]:
    if isinstance(entity_ids, str | bytes | dict) or not isinstance(entity_ids, Sequence):
        raise OnlineStoreError(
            f"entity_ids must be a list of entity ids (got {type(entity_ids).__name__}); e.g. ['u-0001', 'u-0002']"
        )
    rows = []
    for i, item in enumerate(entity_ids):
        if isinstance(item, dict):
            missing = [k for k in key_columns if item.get(k) is None]
            if missing:
                raise OnlineStoreError(f"entity_ids[{i}] = {item!r} lacks key(s) {', '.join(missing)}")
            row = tuple(item[k] for k in key_columns)
        elif isinstance(item, tuple):
            row = item
        else:
            row = (item,)
        if len(row) != len(key_columns) or any(v is None for v in row):
            raise OnlineStoreError(
                f"entity_ids[{i}] = {item!r} is not a value for the key(s) {', '.join(key_columns)}; "
                "give one value per key (a dict or tuple for several keys), never None"
            )
        rows.append(row)
    return rows
