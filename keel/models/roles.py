"""Model roles kept in step across MLflow aliases, MLflow stages and Keel's version tags.

A version of a registered model holds one role, spelt two ways in MLflow:

    champion    alias ``champion``    stage Production   served; scores the batch predictions
    challenger  alias ``challenger``  stage Staging      the canary and shadow
    retired     (no alias)            stage Archived     a former champion, or archived by a person
    none        (no alias)            stage None

Every change of role goes through ``settle``, whoever makes it: Keel registering a
challenger or promoting one (``how`` = ``automatic``), ``keel models promote`` (``manual``),
a person moving an alias (``mlflow-alias``) or transitioning a stage (``mlflow-stage``) in
the MLflow UI or its REST API. ``settle`` writes the aliases, the stages, the version tags
and the record below, so they agree. ``read_roles`` computes the same roles without writing
anything: serving uses it, and so serves a stage transition within one poll even before the
``model_registry`` sensor (or ``keel models sync``) settles it.

Detecting a person's change. The registered-model tag ``keel.roles`` records the roles and
stages as last settled. A stage that differs from it was transitioned since, at the time
MLflow stamps on the version (``last_updated_timestamp``); an alias that differs was moved
since, at a moment MLflow does not record. Changes apply in the order they happened: stage
transitions by their time, then alias moves. A change made after a settle therefore always
wins over the state settled before it (the sensor settles every 30 s). When an alias move
and a stage transition made within the same interval disagree, the alias move counts as the
newer and is applied after it: MLflow gives the move no time that could say otherwise,
aliases are MLflow's supported mechanism (stages are deprecated), and ``models:/NAME@champion``
already resolves to it for every other reader, so choosing it switches nobody twice. (A
version transitioned to Production and then overtaken by the alias's version is retired by
it, as it would have been had the two been a minute apart; ``changes`` says so.)

Taking the champion out (stage Archived or None, deleting its alias or the version; stage
Staging too, which makes it the challenger) rolls the model back to the champion it
replaced, provided that version is still retired *by it*: stage Archived with ``retired_by``
naming the champion taken out, i.e. retired by succession and not archived by a person
since. Otherwise the model has no champion, and serving stops answering for it and reports
not ready. Why: a person who archives the production model says "not this one", not "stop
serving"; the version it replaced served until then and passed the same gates, and
returning to the last good revision is what KServe does when a canary is rolled back. But a
version a person archived is never brought back, and serving one would defy them; with
nothing safe to return to, going dark (a 404 and an unready model, which a load balancer and
an alert see) is the honest answer. Rollbacks chain: archiving the restored version in turn
returns to the one it had retired.

Version tags, rewritten on every change of role (those of an earlier role are removed):

    champion    promotion (how), promoted_at, promotion_reason, previous_champion_version
    challenger  staging (how), staged_at
    retired     retirement (how), retired_at, retired_by (the champion that replaced it;
                absent when a person archived it)

``validation_*`` tags stay: they record what the automatic comparison measured, not a role.

The record is written twice around the changes, first marked pending: a reader that finds a
fresh pending record takes its roles as they will be in a moment and a concurrent ``settle``
leaves the writer alone; a pending record older than ``PENDING_S`` is a writer that died
half way, and the next ``settle`` completes its changes.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from keel.models.registry import CHALLENGER, CHAMPION, ModelRegistryError, registered_model, utc_now

if TYPE_CHECKING:
    from mlflow import MlflowClient

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


# ---------------------------------------------------------------------------------------
# The read, the plan and the one writer


def read_roles(client: MlflowClient, name: str) -> Roles:
    """The roles the registry says now, a person's unsettled changes included; writes nothing."""
    return plan(read_state(client, name))


def settle(client: MlflowClient, name: str, request: Request | None = None) -> Roles:
    """Apply ``request`` (if any) over the registry's current roles, a person's unsettled
    changes included, and write aliases, stages, version tags and the record to agree.

    Without a request, a change another Keel process is writing is left to it; a request
    waits for it (at most ``PENDING_S``, after which the change counts as abandoned)."""
    roles = plan(read_state(client, name), request)
    while roles.in_progress and request is not None:
        time.sleep(0.2)
        roles = plan(read_state(client, name), request)
    if roles.in_step:
        return roles
    if roles.aliases or roles.transitions or roles.tags:
        pending = replace(roles.record, pending=True, written_ms=_now_ms())
        client.set_registered_model_tag(name, RECORD_TAG, pending.to_json())
    for alias, version in roles.aliases:
        if version is None:
            client.delete_registered_model_alias(name, alias)
        else:
            client.set_registered_model_alias(name, alias, str(version))
    for version, stage in roles.transitions:
        transition_stage(client, name, version, stage)
    for version, key, value in roles.tags:
        if value is None:
            client.delete_model_version_tag(name, str(version), key)
        else:
            client.set_model_version_tag(name, str(version), key, value)
    client.set_registered_model_tag(name, RECORD_TAG, replace(roles.record, written_ms=_now_ms()).to_json())
    return roles


def plan(state: RegistryState, request: Request | None = None, now: str | None = None) -> Roles:
    """The effective roles of ``state`` with ``request`` applied, and the writes that make the
    registry say them. Pure: the same state, request and ``now`` give the same plan."""
    now = now or utc_now()
    record = state.record
    if record is not None and record.pending and state.read_ms - record.written_ms < PENDING_S * 1000:
        return _roles(state.name, record, in_progress=True)
    fold = _Fold(state, record or _adopt(state))
    if record is not None and record.pending:
        fold.roles.update(record.changed)
        fold.note(f"completed a change left half written at {record.at or 'an unknown time'}")
    else:
        fold.person_changes(now)
    if request is not None:
        fold.request(request, now)
    fold.finish()
    return fold.result()


class _Fold:
    """Applies changes in order to the roles of the last settle, as each would have been applied alone."""

    def __init__(self, state: RegistryState, base: Record) -> None:
        self.state, self.base = state, base
        self.champion, self.challenger = base.champion, base.challenger
        self.previous, self.how, self.at = base.previous_champion, base.how, base.at
        # The last version to be champion: what a promotion after a champion-less spell replaces.
        self.last_champion = base.champion if base.champion is not None else base.previous_champion
        self.roles: dict[int, Role] = {}  # versions whose role changes
        self.taken_out: int | None = None  # the champion a person took out in this fold
        self.changes: list[str] = []

    def note(self, text: str) -> None:
        self.changes.append(text)

    # A person's changes, found against the record ------------------------------------

    def person_changes(self, now: str) -> None:
        base = self.base
        moved = [
            (vs.updated_ms, vs.version, vs.stage)
            for vs in self.state.versions.values()
            if vs.stage != base.stages.get(vs.version, NONE)
        ]
        for updated_ms, version, stage in sorted(moved):
            self.stage(version, stage, _iso_ms(updated_ms))
        for alias, moved_to, by_stage in (
            (CHAMPION, self.state.aliases.get(CHAMPION), self.champion),
            (CHALLENGER, self.state.aliases.get(CHALLENGER), self.challenger),
        ):
            before = base.champion if alias == CHAMPION else base.challenger
            if moved_to == before:
                continue
            if by_stage != before and by_stage != moved_to:
                self.note(
                    f"alias '{alias}' moved to {_v(moved_to)} and stages made {_v(by_stage)} {alias} since the last "
                    "settle: MLflow does not time alias moves, so the alias counts as the newer change"
                )
            if alias == CHAMPION:
                self.alias_champion(moved_to, now)
            else:
                self.make_challenger(None if moved_to == self.champion else moved_to, "mlflow-alias", now)

    def stage(self, version: int, stage: str, at: str) -> None:
        how = "mlflow-stage"
        if stage == PRODUCTION:
            self.promote(version, how, at, f"transitioned to Production in MLflow at {at}")
            return
        kind = {STAGING: CHALLENGER, ARCHIVED: RETIRED}.get(stage, NO_ROLE)
        if version == self.champion:
            self.take_out(version, Role(NO_ROLE if kind == CHALLENGER else kind, how, at), f"moved to stage {stage}")
        elif kind != CHALLENGER:
            if version == self.challenger:
                self.challenger = None
            self.roles[version] = Role(kind, how, at)
            self.note(f"v{version} {'archived' if kind == RETIRED else 'moved to stage ' + stage} ({how}, {at})")
        if kind == CHALLENGER:
            self.make_challenger(version, how, at)

    def alias_champion(self, version: int | None, at: str) -> None:
        if version is not None:
            self.promote(version, "mlflow-alias", at, f"alias 'champion' moved to v{version} in MLflow")
        elif self.champion is not None:
            self.take_out(self.champion, Role(RETIRED, "mlflow-alias", at), "lost the alias 'champion'")

    # Role changes -----------------------------------------------------------------------

    def request(self, request: Request, now: str) -> None:
        for version in (request.champion, request.challenger):
            if version is not None and version not in self.state.versions:
                known = ", ".join(map(str, sorted(self.state.versions))) or "none"
                raise ModelRegistryError(f"model '{self.state.name}' has no version {version} (versions: {known})")
        if request.champion is not None:
            self.promote(request.champion, request.how, now, request.reason)
        if request.challenger is not None:
            self.make_challenger(None if request.challenger == self.champion else request.challenger, request.how, now)

    def promote(self, version: int, how: str, at: str, reason: str) -> None:
        if version == self.champion:
            return
        old = self.champion
        if old is not None:
            self.roles[old] = Role(RETIRED, how, at, by=version)
        previous = old if old is not None else self.last_champion
        if previous == version:  # champion again after a spell with none
            previous = None
        self.roles[version] = Role(CHAMPION, how, at, reason or f"promoted ({how})", previous=previous)
        if self.challenger == version:
            self.challenger = None
        self.champion, self.previous, self.last_champion = version, previous, version
        self.taken_out, self.how, self.at = None, how, at
        self.note(f"v{version} champion ({how}, {at})" + (f", retiring v{old}" if old is not None else ""))

    def take_out(self, version: int, role: Role, what: str) -> None:
        self.roles[version] = role
        self.taken_out = version
        self.champion, self.last_champion, self.how, self.at = None, version, role.how, role.at
        self.note(f"champion v{version} {what} ({role.how}, {role.at})")

    def make_challenger(self, version: int | None, how: str, at: str) -> None:
        if version == self.challenger:
            return
        old = self.challenger
        if old is not None and old != self.champion:
            self.roles[old] = Role(NO_ROLE, how, at)
        self.challenger = version
        if version is not None:
            self.roles[version] = Role(CHALLENGER, how, at)
        self.note(f"challenger {_v(version)} ({how}, {at})")

    def finish(self) -> None:
        """Roll back to the champion the one taken out replaced, if that one is still retired by it."""
        out = self.taken_out
        if self.champion is not None or out is None:
            return
        candidates = [v for v in self.state.versions if v != self.challenger and self.retired_by(v) == out]
        if candidates:
            reason = f"rollback: champion v{out} was taken out ({self.how}, {self.at})"
            self.promote(max(candidates), self.how, self.at, reason)
            self.changes[-1] += f": {reason}"
        else:
            self.note(f"no champion: v{out} had replaced no version still retired by it")

    def retired_by(self, version: int) -> int | None:
        """The champion that retired ``version`` by succession (None if it is not retired so)."""
        role = self.roles.get(version)
        if role is not None:
            return role.by if role.kind == RETIRED else None
        by = self.state.versions[version].tags.get("retired_by", "")
        return int(by) if self.kind(version) == RETIRED and by.isdigit() else None

    # The result -------------------------------------------------------------------------

    def kind(self, version: int) -> str:
        if version == self.champion:
            return CHAMPION
        if version == self.challenger:
            return CHALLENGER
        if version in self.roles and self.roles[version].kind in (RETIRED, NO_ROLE):
            return self.roles[version].kind
        stage = self.base.stages.get(version, NONE)
        if stage in (ARCHIVED, PRODUCTION):  # Production: a stale one when adopting a registry
            return RETIRED
        # Before stages were kept, a retired champion was marked by its tags only.
        legacy = self.state.record is None and stage == NONE
        return RETIRED if legacy and "retired_at" in self.state.versions[version].tags else NO_ROLE

    def result(self) -> Roles:
        state = self.state
        stages = {v: STAGE_OF[self.kind(v)] for v in state.versions}
        wanted = {CHAMPION: self.champion, CHALLENGER: self.challenger}
        aliases = tuple((a, v) for a, v in wanted.items() if state.aliases.get(a) != v)
        transitions = tuple(sorted((v, stage) for v, stage in stages.items() if state.versions[v].stage != stage))
        tags: list[tuple[int, str, str | None]] = []
        changed = {}
        for v, vs in sorted(state.versions.items()):
            kind = self.kind(v)
            role = self.roles.get(v)
            if role is not None and role.kind == kind:
                desired, changed[v] = role.tags(), role
            else:
                desired = {k: vs.tags[k] for k in ROLE_TAGS[kind] if k in vs.tags}
            tags += [(v, k, value) for k, value in desired.items() if vs.tags.get(k) != value]
            tags += [(v, k, None) for k in ALL_ROLE_TAGS if k in vs.tags and k not in desired]
        record = Record(
            champion=self.champion,
            challenger=self.challenger,
            previous_champion=self.previous if self.champion is not None else self.last_champion,
            how=self.how,
            at=self.at,
            stages=stages,
            changed=changed,
        )
        unchanged = not aliases and not transitions and not tags and record.same_roles(state.record)
        return Roles(
            name=state.name,
            champion=self.champion,
            challenger=self.challenger,
            previous_champion=record.previous_champion,
            how=self.how,
            at=self.at,
            stages=stages,
            changes=tuple(self.changes),
            aliases=aliases,
            transitions=transitions,
            tags=tuple(tags),
            record=None if unchanged else record,
        )


def _adopt(state: RegistryState) -> Record:
    """A record for a registry never settled: its aliases are Keel's roles as they were; a
    Production (Staging) version counts as transitioned since only where no alias names a
    champion (challenger)."""
    champion = state.aliases.get(CHAMPION)
    challenger = state.aliases.get(CHALLENGER)
    if challenger == champion:
        challenger = None  # a promoted challenger kept its alias before roles had stages
    stages = {}
    for v, vs in state.versions.items():
        unclaimed = (vs.stage == PRODUCTION and champion is None) or (vs.stage == STAGING and challenger is None)
        stages[v] = NONE if unclaimed and v not in (champion, challenger) else vs.stage
    tags = state.versions[champion].tags if champion in state.versions else {}
    previous = tags.get("previous_champion_version", "")
    return Record(
        champion=champion,
        challenger=challenger,
        previous_champion=int(previous) if previous.isdigit() else None,
        how=tags.get("promotion", ""),
        at=tags.get("promoted_at", ""),
        stages=stages,
    )


def _roles(name: str, record: Record, *, in_progress: bool = False) -> Roles:
    return Roles(
        name=name,
        champion=record.champion,
        challenger=record.challenger,
        previous_champion=record.previous_champion,
        how=record.how,
        at=record.at,
        stages=dict(record.stages),
        in_progress=in_progress,
    )


# ---------------------------------------------------------------------------------------
# MLflow plumbing


def read_state(client: MlflowClient, name: str) -> RegistryState:
    model = registered_model(client, name)
    aliases = {a: int(v) for a, v in model.aliases.items() if a in (CHAMPION, CHALLENGER)}
    versions = {}
    token = None
    while True:
        page = client.search_model_versions(f"name = '{_quote(name)}'", page_token=token)
        for mv in page:
            versions[int(mv.version)] = VersionState(
                int(mv.version), canonical_stage(mv.current_stage), int(mv.last_updated_timestamp or 0), dict(mv.tags)
            )
        token = page.token
        if not token:
            break
    recorded = model.tags.get(RECORD_TAG)
    record = Record.from_json(recorded) if recorded else None
    # An alias can only name an existing version; one deleted between the two reads is gone.
    aliases = {a: v for a, v in aliases.items() if v in versions}
    return RegistryState(name, aliases, versions, record, _now_ms())


def transition_stage(client: MlflowClient, name: str, version: int, stage: str) -> None:
    # MLflow deprecates stages for aliases (a FutureWarning on every transition since 2.9), yet
    # its UI and REST API still move them and people use them: Keel keeps them in step with the
    # aliases, so this one call is expected to warn.
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message=r"``mlflow\.tracking\.client\.MlflowClient\.transition_model_version_stage`` is deprecated",
            category=FutureWarning,
        )
        client.transition_model_version_stage(name, str(version), stage, archive_existing_versions=False)


def canonical_stage(stage: str | None) -> str:
    by_lower = {s.lower(): s for s in (PRODUCTION, STAGING, ARCHIVED, NONE)}
    return by_lower.get((stage or NONE).lower(), NONE)


def _quote(name: str) -> str:
    return name.replace("'", "\\'")


def _v(version: int | None) -> str:
    return f"v{version}" if version is not None else "none"


def _iso_ms(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="seconds")


def _now_ms() -> int:
    return int(time.time() * 1000)
