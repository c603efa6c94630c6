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
and the record (the registered-model tag ``keel.roles``), so they agree. ``read_roles`` computes the same roles without writing
anything: serving uses it, and so serves a stage transition within one poll even before the
``model_registry`` sensor (or ``keel models sync``) settles it.

How a person's change is found and ordered, and when taking the champion out rolls back,
is ``keel.models.role_plan``; each role's alias, stage and tags are ``keel.models.role_types``.

The record is written twice around the changes, first marked pending: a reader that finds a
fresh pending record takes its roles as they will be in a moment and a concurrent ``settle``
leaves the writer alone; a pending record older than ``PENDING_S`` is a writer that died
half way, and the next ``settle`` completes its changes.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import replace
from typing import TYPE_CHECKING

from keel.models.registry_client import quote, registered_model
from keel.models.role_plan import plan
from keel.models.role_types import (
    ARCHIVED,
    CHALLENGER,
    CHAMPION,
    NONE,
    PRODUCTION,
    RECORD_TAG,
    STAGING,
    Record,
    RegistryState,
    Request,
    Roles,
    VersionState,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient


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


def read_state(client: MlflowClient, name: str) -> RegistryState:
    model = registered_model(client, name)
    aliases = {a: int(v) for a, v in model.aliases.items() if a in (CHAMPION, CHALLENGER)}
    versions = {}
    token = None
    while True:
        page = client.search_model_versions(f"name = '{quote(name)}'", page_token=token)
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


def _now_ms() -> int:
    return int(time.time() * 1000)
