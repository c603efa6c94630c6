"""Planning a change of roles: the roles as last settled, the changes a person made in MLflow
since and Keel's own request, folded in order into the roles to write. Pure: ``plan`` reads
and writes nothing; ``keel.models.roles`` reads the registry for it and writes its result.

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
"""

from __future__ import annotations

import datetime as dt

from keel.models.registry_client import ModelRegistryError, utc_now
from keel.models.role_types import (
    ALL_ROLE_TAGS,
    ARCHIVED,
    CHALLENGER,
    CHAMPION,
    NO_ROLE,
    NONE,
    PENDING_S,
    PRODUCTION,
    RETIRED,
    ROLE_TAGS,
    STAGE_OF,
    STAGING,
    Record,
    RegistryState,
    Request,
    Role,
    Roles,
)


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


def _v(version: int | None) -> str:
    return f"v{version}" if version is not None else "none"


def _iso_ms(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="seconds")
