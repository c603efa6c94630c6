"""Declarations of features: aggregations over sliding windows, derived expressions and feature groups.

A group is checked when it is built, its ``where`` and derived expressions too: ``check_expressions``
binds them in DuckDB against empty tables of the source's (or the upstream groups') columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from keel.dsl.primitives import COLUMN_TYPES, DUCKDB_TYPES, LIFETIME, DeclarationError, check_name, window_seconds
from keel.dsl.sources import Entity, EventSource

AGGREGATIONS = ("count", "sum", "avg", "min", "max", "stddev", "first", "last", "count_distinct")
_NUMERIC = ("int64", "float64")
_ORDERED = ("int64", "float64", "timestamp", "date", "string")


@dataclass(frozen=True)
class Feature:
    """An aggregation of a source column over a sliding window ``(t - window, t]``.

    ``count`` counts events (or non-NULL values of ``column`` when one is given); ``first`` and
    ``last`` take the value of the earliest / latest event in the window (ties at one
    timestamp are broken by event id). ``where`` is a SQL predicate over the source's
    columns that selects the events the feature sees.
    """

    name: str
    agg: str
    column: str | None = None
    window: str = LIFETIME
    where: str | None = None
    description: str = ""

    @property
    def window_s(self) -> int | None:
        return window_seconds(self.window)


@dataclass(frozen=True)
class Derived:
    """A feature computed from others by a SQL expression, e.g. ``'amount_sum_7d / nullif(txn_count_30d, 0)'``.

    In a group with a source, the expression names the group's own features; in a group
    reading other groups, it names theirs as ``group.feature``.
    """

    name: str
    expr: str
    type: str = "float64"
    description: str = ""


@dataclass(frozen=True)
class FeatureGroup:
    """Features of one entity, computed from one event source or from other groups.

    ``version`` is the definition's version: change the features and bump it, so tables
    written by the old definition stay readable (time travel) and the registry keeps both.
    ``ttl``: at time t, when the entity's latest event is older than this, its features are
    NULL (counts 0).
    """

    name: str
    entity: Entity
    features: tuple[Feature | Derived, ...]
    source: EventSource | None = None
    upstream: tuple[FeatureGroup | str, ...] = ()
    ttl: str | None = None
    online: bool = False
    owner: str = ""
    description: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    version: int = 1
    namespace: str = "features"

    def __post_init__(self) -> None:
        check_name("feature group", self.name)
        object.__setattr__(self, "features", tuple(self.features))
        object.__setattr__(self, "upstream", tuple(self.upstream))
        where = f"feature group {self.name!r}"
        if (self.source is None) == (not self.upstream):
            raise DeclarationError(f"{where}: give either source=<EventSource> or upstream=[groups], exactly one")
        if not isinstance(self.version, int) or self.version < 1:
            raise DeclarationError(f"{where}: version {self.version!r} must be a whole number from 1")
        if not self.features:
            raise DeclarationError(f"{where}: declares no features")
        if self.ttl is not None and self.upstream:
            raise DeclarationError(
                f"{where}: ttl applies to groups with a source; the upstream groups' TTLs apply here"
            )
        if self.ttl is not None:
            try:
                if window_seconds(self.ttl) is None:
                    raise ValueError(f"ttl {self.ttl!r} must be a duration, not lifetime (leave ttl=None for no TTL)")
            except ValueError as exc:
                raise DeclarationError(f"{where}: ttl: {exc}") from None
        if self.source is not None and self.source.entity.join_keys != self.entity.join_keys:
            raise DeclarationError(
                f"{where}: entity {self.entity.name!r} has keys {self.entity.join_keys} but source "
                f"{self.source.name!r} is keyed by {self.source.entity.join_keys}; use the source's entity"
            )
        seen: set[str] = set()
        for feat in self.features:
            if not isinstance(feat, Feature | Derived):
                raise DeclarationError(f"{where}: {feat!r} is not a Feature or Derived")
            check_name(f"{where}: feature", feat.name)
            if feat.name in seen:
                raise DeclarationError(f"{where}: feature {feat.name!r} is declared twice; give each a unique name")
            if feat.name in self.entity.join_keys or feat.name in ("feature_ts", "_t", "_probe"):
                raise DeclarationError(f"{where}: feature name {feat.name!r} is reserved; rename the feature")
            seen.add(feat.name)
            if isinstance(feat, Feature):
                self._check_feature(feat)
            elif feat.type not in COLUMN_TYPES:
                raise DeclarationError(
                    f"{where}, feature {feat.name!r}: type {feat.type!r} is not supported "
                    f"(use one of {', '.join(COLUMN_TYPES)})"
                )
        check_expressions(self)

    def _check_feature(self, feat: Feature) -> None:
        where = f"feature group {self.name!r}, feature {feat.name!r}"
        if self.source is None:
            raise DeclarationError(
                f"{where}: a group reading other groups computes Derived features only "
                "(aggregate in the upstream group, then combine here)"
            )
        if feat.agg not in AGGREGATIONS:
            raise DeclarationError(
                f"{where}: aggregation {feat.agg!r} is not known (use one of {', '.join(AGGREGATIONS)})"
            )
        try:
            feat.window_s  # noqa: B018 - parse to validate
        except ValueError as exc:
            raise DeclarationError(f"{where}: {exc}") from None
        if feat.column is None:
            if feat.agg != "count":
                raise DeclarationError(f"{where}: {feat.agg} needs column=<a column of {self.source.name!r}>")
            return
        names = [c.name for c in self.source.all_columns()]
        if feat.column not in names:
            raise DeclarationError(
                f"{where}: column {feat.column!r} is not in source {self.source.name!r} (columns: {', '.join(names)})"
            )
        typ = self.source.column(feat.column).type
        if feat.agg in ("sum", "avg", "stddev") and typ not in _NUMERIC:
            raise DeclarationError(
                f"{where}: {feat.agg} needs a numeric column, but {feat.column!r} is {typ}; "
                "use count, count_distinct, first or last"
            )
        if feat.agg in ("min", "max") and typ not in _ORDERED:
            raise DeclarationError(f"{where}: {feat.agg} needs an ordered column, but {feat.column!r} is {typ}")

    # What the engine and the tables need -----------------------------------------------

    @property
    def table_name(self) -> str:
        return f"{self.namespace}.{self.name}"

    @property
    def key_columns(self) -> list[str]:
        return list(self.entity.join_keys)

    def feature(self, name: str) -> Feature | Derived:
        for feat in self.features:
            if feat.name == name:
                return feat
        known = ", ".join(f.name for f in self.features)
        raise DeclarationError(f"feature group {self.name!r} has no feature {name!r} (features: {known})")

    def feature_type(self, feat: Feature | Derived) -> str:
        if isinstance(feat, Derived):
            return feat.type
        if feat.agg in ("count", "count_distinct"):
            return "int64"
        if feat.agg in ("avg", "stddev"):
            return "float64"
        typ = self.source.column(feat.column).type
        return "float64" if feat.agg == "sum" and typ == "float64" else typ

    def arrow_schema(self) -> pa.Schema:
        """The group's table: keys, ``feature_ts`` (the moment the values hold for), features."""
        fields = [pa.field(k, COLUMN_TYPES[t], nullable=False) for k, t in self.entity.join_keys.items()]
        fields.append(pa.field("feature_ts", COLUMN_TYPES["timestamp"], nullable=False))
        fields += [pa.field(f.name, COLUMN_TYPES[self.feature_type(f)]) for f in self.features]
        return pa.schema(fields)

    @property
    def max_window_s(self) -> int | None:
        """The longest window of the group's aggregations; None when one is lifetime."""
        windows = [f.window_s for f in self.features if isinstance(f, Feature)]
        if any(w is None for w in windows):
            return None
        return max(windows, default=0)

    def fingerprint(self) -> str:
        """A digest of everything that decides the group's values (not owner, tags or description)."""
        import hashlib
        import json

        spec = {
            "entity": self.entity.join_keys,
            "source": None if self.source is None else [self.source.table_name, self.source.timestamp],
            "upstream": [u.fingerprint() if isinstance(u, FeatureGroup) else u for u in self.upstream],
            "ttl": self.ttl,
            "features": [
                {"name": f.name, "agg": f.agg, "column": f.column, "window": f.window, "where": f.where}
                if isinstance(f, Feature)
                else {"name": f.name, "expr": f.expr, "type": f.type}
                for f in self.features
            ],
        }
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]

    def __hash__(self) -> int:
        return hash(self.name)


def check_expressions(group: FeatureGroup) -> None:
    """Bind every ``where`` and derived expression in DuckDB against empty typed tables.

    Unknown columns and type errors surface here, at declaration, naming the group and the feature.
    """
    import duckdb

    con = duckdb.connect()
    try:
        if group.source is not None:
            cols = ", ".join(f'"{c.name}" {DUCKDB_TYPES[c.type]}' for c in group.source.all_columns())
            con.execute(f"CREATE TABLE src ({cols})")
            own = [f for f in group.features if isinstance(f, Feature)]
            feats = ", ".join(f'"{f.name}" {DUCKDB_TYPES[group.feature_type(f)]}' for f in own)
            con.execute(f"CREATE TABLE {group.name} ({feats})")
            for feat in own:
                if feat.where:
                    _bind(con, group, feat.name, f"SELECT CAST(({feat.where}) AS BOOLEAN) FROM src", "where")
            frm = group.name
        else:
            for up in group.upstream:
                if not isinstance(up, FeatureGroup):
                    return  # named upstream groups are checked when the project resolves them
                feats = ", ".join(f'"{f.name}" {DUCKDB_TYPES[up.feature_type(f)]}' for f in up.features)
                con.execute(f"CREATE TABLE {up.name} ({feats})")
            frm = ", ".join(u.name for u in group.upstream)
        for feat in group.features:
            if isinstance(feat, Derived):
                _bind(
                    con, group, feat.name, f"SELECT CAST(({feat.expr}) AS {DUCKDB_TYPES[feat.type]}) FROM {frm}", "expr"
                )
                if group.source is not None:
                    # Later derived features may use earlier ones.
                    con.execute(f'ALTER TABLE {group.name} ADD COLUMN "{feat.name}" {DUCKDB_TYPES[feat.type]}')
    finally:
        con.close()


def _bind(con, group: FeatureGroup, feature: str, sql: str, what: str) -> None:
    import duckdb

    try:
        con.execute(sql + " LIMIT 0")
    except duckdb.Error as exc:
        message = str(exc).split("\n")[0]
        hint = (
            f"name columns of source {group.source.name!r}"
            if what == "where"
            else "name features of this group"
            if group.source is not None
            else "name upstream features as group.feature"
        )
        raise DeclarationError(
            f"feature group {group.name!r}, feature {feature!r}: {what} does not bind ({message}); {hint}"
        ) from None
