"""Declarations: entities, event sources and feature groups.

A project declares these in its own module (``pipelines`` by default); the engine, the
Dagster layer and the CLI all read the same objects. Declarations are validated when they
are built, so a mistake fails at import with a message naming the thing and the fix.

The vocabulary is imported from here (``from keel.dsl import EventSource``); its parts live in
``primitives`` (types, names, durations), ``sources`` (entities, event sources) and ``features``.
"""

from keel.dsl.features import AGGREGATIONS, Derived, Feature, FeatureGroup, check_expressions
from keel.dsl.primitives import COLUMN_TYPES, DUCKDB_TYPES, LIFETIME, DeclarationError, check_name, window_seconds
from keel.dsl.sources import ON_DUPLICATE, Column, Entity, EventSource

__all__ = [
    "AGGREGATIONS",
    "COLUMN_TYPES",
    "DUCKDB_TYPES",
    "LIFETIME",
    "ON_DUPLICATE",
    "Column",
    "DeclarationError",
    "Derived",
    "Entity",
    "EventSource",
    "Feature",
    "FeatureGroup",
    "check_expressions",
    "check_name",
    "window_seconds",
]
