"""Finding a project's declarations: the module named by KEEL_PROJECT exposes ``project``."""

from __future__ import annotations

import datetime as dt
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

from keel.dsl import DeclarationError, Entity, EventSource, FeatureGroup, check_expressions


@dataclass(frozen=True)
class Project:
    """Everything a project declares, in one object the engine and the Dagster layer read."""

    name: str
    sources: tuple[EventSource, ...]
    # The first day of the project's events: every daily partition (raw, features, predictions,
    # monitoring) starts here, so the Dagster UI counts only days that can hold data.
    start_date: dt.date
    entities: tuple[Entity, ...] = ()
    feature_groups: tuple[FeatureGroup, ...] = ()
    # Makes the project's demo data: generate(days=, seed=, drift_after=) -> {source name: Arrow table}.
    generate: Callable | None = None
    # Writes generated tables to files: write_files(tables, out_dir) -> [paths].
    write_files: Callable | None = None
    description: str = ""
    tags: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sources", tuple(self.sources))
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise DeclarationError(f"project {self.name!r}: event source name(s) {dupes} declared twice")
        object.__setattr__(self, "feature_groups", resolve_groups(self.name, self.feature_groups, self.sources))

    def source(self, name: str) -> EventSource:
        for src in self.sources:
            if src.name == name:
                return src
        known = ", ".join(s.name for s in self.sources) or "none"
        raise DeclarationError(f"project {self.name!r} has no event source {name!r} (known: {known})")

    def group(self, name: str) -> FeatureGroup:
        for group in self.feature_groups:
            if group.name == name:
                return group
        known = ", ".join(g.name for g in self.feature_groups) or "none"
        raise DeclarationError(f"project {self.name!r} has no feature group {name!r} (known: {known})")

    def downstream(self, name: str) -> list[FeatureGroup]:
        """Groups that read group ``name`` directly."""
        return [g for g in self.feature_groups if any(u.name == name for u in g.upstream)]


def resolve_groups(
    project: str, groups: tuple[FeatureGroup, ...], sources: tuple[EventSource, ...]
) -> tuple[FeatureGroup, ...]:
    """Check names, resolve upstream groups given by name, refuse cycles; upstream first in the result."""
    groups = tuple(groups)
    by_name: dict[str, FeatureGroup] = {}
    for group in groups:
        if group.name in by_name:
            raise DeclarationError(f"project {project!r}: feature group {group.name!r} is declared twice")
        by_name[group.name] = group
    source_names = {s.name for s in sources}
    for group in groups:
        if group.source is not None and group.source.name not in source_names:
            raise DeclarationError(
                f"feature group {group.name!r}: source {group.source.name!r} is not one of project "
                f"{project!r}'s sources; add it to the project's sources"
            )
        for up in group.upstream:
            name = up if isinstance(up, str) else up.name
            if name not in by_name:
                raise DeclarationError(
                    f"feature group {group.name!r}: upstream group {name!r} is not declared in project {project!r} "
                    f"(groups: {', '.join(by_name)})"
                )
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            cycle = " -> ".join([*path[path.index(name) :], name])
            raise DeclarationError(f"feature groups form a cycle: {cycle}; a group cannot read itself")
        state[name] = "visiting"
        for up in by_name[name].upstream:
            visit(up if isinstance(up, str) else up.name, [*path, name])
        state[name] = "done"
        order.append(name)

    for name in by_name:
        visit(name, [])
    resolved: dict[str, FeatureGroup] = {}
    for name in order:
        group = by_name[name]
        if any(isinstance(u, str) for u in group.upstream):
            ups = tuple(resolved[u if isinstance(u, str) else u.name] for u in group.upstream)
            object.__setattr__(group, "upstream", ups)
            check_expressions(group)
        for up in group.upstream:
            if up.entity.join_keys != group.entity.join_keys:
                raise DeclarationError(
                    f"feature group {group.name!r}: upstream {up.name!r} is keyed by {up.entity.join_keys}, "
                    f"not {group.entity.join_keys}; groups read groups of the same entity"
                )
        resolved[name] = group
    return tuple(resolved[n] for n in order)


def load_project(module: str = "pipelines") -> Project:
    """Import ``module`` and return its ``project``; errors say which module and what is missing."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):
            raise DeclarationError(
                f"KEEL_PROJECT={module!r}: no such module on the Python path "
                "(set KEEL_PROJECT to the package holding your declarations)"
            ) from None
        raise
    project = getattr(mod, "project", None)
    if not isinstance(project, Project):
        raise DeclarationError(
            f"module {module!r} has no 'project' (a keel.project.Project); declare one in {module}/__init__.py"
        )
    return project
