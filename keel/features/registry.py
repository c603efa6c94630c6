"""The feature registry: every version of every feature group, and what it reads and feeds.

Kept in the lakehouse as ``keel.feature_registry``, one row per (group, version). A group's
definition is fingerprinted; registering a changed definition under an old version is
refused, so a version always means one definition and old versions stay describable.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass

import pyarrow as pa
from pyiceberg.expressions import And, EqualTo

from keel.dsl import Derived, Feature, FeatureGroup
from keel.lakehouse.tables import Lakehouse, replace_rows
from keel.project import Project

REGISTRY_TABLE = "keel.feature_registry"
REGISTRY_SCHEMA = pa.schema(
    [
        pa.field("group_name", pa.string(), nullable=False),
        pa.field("version", pa.int64(), nullable=False),
        pa.field("fingerprint", pa.string(), nullable=False),
        pa.field("entity", pa.string(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("upstream", pa.string()),
        pa.field("definition", pa.string(), nullable=False),
        pa.field("ttl", pa.string()),
        pa.field("online", pa.bool_(), nullable=False),
        pa.field("owner", pa.string()),
        pa.field("description", pa.string()),
        pa.field("tags", pa.string()),
        pa.field("code_version", pa.string()),
        pa.field("registered_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)


class RegistryError(ValueError):
    """A definition conflicts with what the registry holds."""


@dataclass(frozen=True)
class Lineage:
    group: str
    sources: list[str]
    upstream: list[str]
    downstream: list[str]
    models: list[str]


def describe(feat: Feature | Derived) -> str:
    """One line per feature, as the CLI and Dagster metadata show it."""
    if isinstance(feat, Derived):
        return f"{feat.expr}  ({feat.type})"
    what = f"{feat.agg}({feat.column or '*'})"
    where = f" where {feat.where}" if feat.where else ""
    return f"{what} over {feat.window}{where}"


def definition(group: FeatureGroup) -> dict:
    return {
        "features": [
            {"name": f.name, "kind": "derived", "expr": f.expr, "type": f.type}
            if isinstance(f, Derived)
            else {"name": f.name, "agg": f.agg, "column": f.column, "window": f.window, "where": f.where}
            for f in group.features
        ],
        "keys": group.entity.join_keys,
    }


def registered(lake: Lakehouse, group: str | None = None) -> list[dict]:
    """Registry rows (all groups, or one), oldest version first."""
    if not lake.exists(REGISTRY_TABLE):
        return []
    rows = lake.read(REGISTRY_TABLE, row_filter=EqualTo("group_name", group) if group else None).to_pylist()
    return sorted(rows, key=lambda r: (r["group_name"], r["version"]))


def register(lake: Lakehouse, project: Project, group: FeatureGroup) -> bool:
    """Record the group's current version (and its upstream groups'); True if a row was added."""
    added = False
    for up in group.upstream:
        added |= register(lake, project, up)
    lake.ensure_table(REGISTRY_TABLE, REGISTRY_SCHEMA)
    fingerprint = group.fingerprint()
    for row in registered(lake, group.name):
        if row["version"] == group.version:
            if row["fingerprint"] == fingerprint:
                return added
            raise RegistryError(
                f"feature group {group.name!r} changed since version {group.version} was registered "
                f"(fingerprint {row['fingerprint']} -> {fingerprint}); bump its version to "
                f"{max(r['version'] for r in registered(lake, group.name)) + 1} so the old tables stay readable"
            )
    row = {
        "group_name": group.name,
        "version": group.version,
        "fingerprint": fingerprint,
        "entity": group.entity.name,
        "source": group.source.table_name if group.source else None,
        "upstream": ",".join(u.name for u in group.upstream) or None,
        "definition": json.dumps(definition(group), sort_keys=True),
        "ttl": group.ttl,
        "online": group.online,
        "owner": group.owner or None,
        "description": group.description or None,
        "tags": json.dumps(group.tags, sort_keys=True) if group.tags else None,
        "code_version": lake.code_version,
        "registered_at": dt.datetime.now(dt.UTC),
    }
    scope = And(EqualTo("group_name", group.name), EqualTo("version", group.version))
    props = lake.snapshot_properties("registry", [], f"register-{group.name}-v{group.version}")
    replace_rows(lake.table(REGISTRY_TABLE), pa.Table.from_pylist([row], schema=REGISTRY_SCHEMA), scope, props)
    return True


def lineage(project: Project, name: str, models: list[str] | None = None) -> Lineage:
    """Where a group's data comes from and where it goes."""
    group = project.group(name)

    def sources(g: FeatureGroup) -> list[str]:
        own = [g.source.table_name] if g.source else []
        return own + [s for u in g.upstream for s in sources(u)]

    def downstream(g: str) -> list[str]:
        direct = [d.name for d in project.downstream(g)]
        return direct + [x for d in direct for x in downstream(d)]

    return Lineage(
        group=name,
        sources=list(dict.fromkeys(sources(group))),
        upstream=[u.name for u in group.upstream],
        downstream=list(dict.fromkeys(downstream(name))),
        models=models or [],
    )
