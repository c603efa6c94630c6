"""The vocabulary of model roles: each role's alias, stage and version tags, the record of
the roles as last settled, and the values ``keel.models.roles`` reads, plans and writes.

Version tags, rewritten on every change of role (those of an earlier role are removed):

    champion    promotion (how), promoted_at, promotion_reason, previous_champion_version
    challenger  staging (how), staged_at
    retired     retirement (how), retired_at, retired_by (the champion that replaced it;
                absent when a person archived it)

``validation_*`` tags stay: they record what the automatic comparison measured, not a role.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

CHAMPION = "champion"
CHALLENGER = "challenger"
PRODUCTION, STAGING, ARCHIVED, NONE = "Production", "Staging", "Archived", "None"
RETIRED, NO_ROLE = "retired", "none"
STAGE_OF = {CHAMPION: PRODUCTION, CHALLENGER: STAGING, RETIRED: ARCHIVED, NO_ROLE: NONE}
HOWS = ("automatic", "manual", "mlflow-alias", "mlflow-stage")
RECORD_TAG = "keel.roles"
# A settle takes well under a second; a pending record this old is a writer that died.
PENDING_S = 120
ROLE_TAGS = {
    CHAMPION: ("promotion", "promoted_at", "promotion_reason", "previous_champion_version"),
    CHALLENGER: ("staging", "staged_at"),
    RETIRED: ("retirement", "retired_at", "retired_by"),
    NO_ROLE: (),
}
# Written before stages were kept ("true" on a retired champion); the Archived stage and
# retired_by say it now.
LEGACY_TAGS = ("previous_champion",)
ALL_ROLE_TAGS = tuple(t for tags in ROLE_TAGS.values() for t in tags) + LEGACY_TAGS


@dataclass(frozen=True)
class VersionState:
    """One version as the registry holds it now."""

    version: int
    stage: str
    updated_ms: int
    tags: Mapping[str, str]


@dataclass(frozen=True)
class Role:
    """A role a version takes in a change, with what its tags will say."""

    kind: str
    how: str
    at: str
    reason: str = ""
    previous: int | None = None  # champion: the champion it replaced
    by: int | None = None  # retired: the champion that replaced it

    def tags(self) -> dict[str, str]:
        if self.kind == CHAMPION:
            out = {"promotion": self.how, "promoted_at": self.at, "promotion_reason": self.reason}
            if self.previous is not None:
                out["previous_champion_version"] = str(self.previous)
            return {k: v for k, v in out.items() if v}
        if self.kind == CHALLENGER:
            return {"staging": self.how, "staged_at": self.at}
        if self.kind == RETIRED:
            out = {"retirement": self.how, "retired_at": self.at}
            if self.by is not None:
                out["retired_by"] = str(self.by)
            return out
        return {}

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v not in (None, "")}


@dataclass(frozen=True)
class Record:
    """The roles and stages as last settled (the registered-model tag ``keel.roles``)."""

    champion: int | None = None
    challenger: int | None = None
    previous_champion: int | None = None
    how: str = ""  # how the champion last changed
    at: str = ""  # and when
    stages: Mapping[int, str] = field(default_factory=dict)  # versions not listed are in stage None
    changed: Mapping[int, Role] = field(default_factory=dict)  # the roles the last settle gave
    pending: bool = False
    written_ms: int = 0

    def to_json(self) -> str:
        grouped: dict[str, list[int]] = {}
        for version, stage in sorted(self.stages.items()):
            if stage != NONE:
                grouped.setdefault(stage, []).append(version)
        return json.dumps(
            {
                "champion": self.champion,
                "challenger": self.challenger,
                "previous_champion": self.previous_champion,
                "how": self.how,
                "at": self.at,
                "stages": grouped,
                "changed": {str(v): role.as_dict() for v, role in sorted(self.changed.items())},
                "pending": self.pending,
                "written_ms": self.written_ms,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> Record | None:
        try:
            raw = json.loads(text)
            return cls(
                champion=raw.get("champion"),
                challenger=raw.get("challenger"),
                previous_champion=raw.get("previous_champion"),
                how=raw.get("how", ""),
                at=raw.get("at", ""),
                stages={int(v): stage for stage, versions in raw.get("stages", {}).items() for v in versions},
                changed={int(v): Role(**role) for v, role in raw.get("changed", {}).items()},
                pending=bool(raw.get("pending", False)),
                written_ms=int(raw.get("written_ms", 0)),
            )
        except (ValueError, TypeError, AttributeError):
            return None  # not ours, or hand-edited beyond repair: adopt the registry as it is

    def same_roles(self, other: Record | None) -> bool:
        keys = ("champion", "challenger", "previous_champion", "how", "at", "pending")
        return (
            other is not None
            and all(getattr(self, k) == getattr(other, k) for k in keys)
            and (
                {v: s for v, s in self.stages.items() if s != NONE}
                == {v: s for v, s in other.stages.items() if s != NONE}
            )
        )


@dataclass(frozen=True)
class RegistryState:
    """What ``read_roles`` and ``settle`` read: aliases, every version's stage and tags, the record."""

    name: str
    aliases: Mapping[str, int]
    versions: Mapping[int, VersionState]
    record: Record | None
    read_ms: int


@dataclass(frozen=True)
class Roles:
    """A model's effective roles, and what a settle writes (or wrote) to make the registry say them."""

    name: str
    champion: int | None
    challenger: int | None
    previous_champion: int | None
    how: str  # how the champion last changed: automatic | manual | mlflow-alias | mlflow-stage
    at: str  # when, ISO 8601 UTC
    stages: Mapping[int, str]
    changes: tuple[str, ...] = ()  # what moved since the last settle, in order
    aliases: tuple[tuple[str, int | None], ...] = ()  # alias moves to write
    transitions: tuple[tuple[int, str], ...] = ()  # stage transitions to write
    tags: tuple[tuple[int, str, str | None], ...] = ()  # version tags to set (None: delete)
    record: Record | None = None  # the record to write
    in_progress: bool = False  # another Keel process is writing a change right now

    @property
    def in_step(self) -> bool:
        """Whether aliases, stages, tags and record already say these roles (nothing to write)."""
        return self.in_progress or (not self.aliases and not self.transitions and not self.tags and self.record is None)

    def summary(self) -> str:
        champion = f"v{self.champion}" if self.champion is not None else "none"
        challenger = f"v{self.challenger}" if self.challenger is not None else "none"
        return f"{self.name}: champion {champion}, challenger {challenger}"


@dataclass(frozen=True)
class Request:
    """A change Keel itself makes: promote ``champion`` and/or make ``challenger`` the challenger."""

    how: str
    champion: int | None = None
    challenger: int | None = None
    reason: str = ""

    def __post_init__(self) -> None:
        if self.how not in HOWS:
            raise ValueError(f"promotion how {self.how!r} is not known (use one of {', '.join(HOWS)})")
