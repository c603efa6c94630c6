"""Finding a project's declarations: the module named by KEEL_PROJECT exposes ``project``."""

from __future__ import annotations

import datetime as dt
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

from keel.dsl import DeclarationError, Entity, EventSource


@dataclass(frozen=True)
class Project:
    """Everything a project declares, in one object the engine and the Dagster layer read."""

    name: str
    sources: tuple[EventSource, ...]
    start_date: dt.date
    entities: tuple[Entity, ...] = ()
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

    def source(self, name: str) -> EventSource:
        for src in self.sources:
            if src.name == name:
                return src
        known = ", ".join(s.name for s in self.sources) or "none"
        raise DeclarationError(f"project {self.name!r} has no event source {name!r} (known: {known})")


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
