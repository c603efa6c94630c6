"""Model roles against a real file-backed MLflow registry (SQLite): every way a role changes
(Keel's automatic and manual promotions, a person moving an alias or a stage in MLflow)
leaves aliases, stages and version tags agreeing, with no tag left from an earlier role.

Versions here are registered without artifacts: roles never load a model. A "person" moves
stages with MLflow's own client, as its UI and REST API do.
"""

import datetime as dt
import logging
import time

import pytest
from mlflow import MlflowClient

from keel.config import Settings
from keel.models import promotion, registry
from keel.models.registry_client import ModelRegistryError, mlflow_client
from keel.models.role_plan import plan
from keel.models.role_types import ARCHIVED, NONE, PENDING_S, PRODUCTION, RECORD_TAG, STAGING, Record, Request
from keel.models.roles import read_roles, read_state, settle
from tests.factories.registry import assert_in_step, person_moves_stage, registry_view


@pytest.fixture(scope="module")
def settings(tmp_path_factory) -> Settings:
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    home = tmp_path_factory.mktemp("roles")
    return Settings.from_env({"KEEL_HOME": str(home), "KEEL_CODE_VERSION": "sha-roles"})


@pytest.fixture(scope="module")
def client(settings) -> MlflowClient:
    return mlflow_client(settings)


@pytest.fixture
def model(client, request) -> str:
    """A registered model named after the test, with four versions in no role."""
    name = request.node.name.removeprefix("test_")[:60]
    client.create_registered_model(name)
    experiment = client.create_experiment(name)
    for _ in range(4):
        run = client.create_run(experiment)
        client.create_model_version(name, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    return name


def crowned(client, name) -> None:
    """v1 champion, v2 champion over it (so v1 is retired by v2), v3 the challenger."""
    settle(client, name, Request("automatic", challenger=1))
    settle(client, name, Request("automatic", champion=1, reason="first"))
    settle(client, name, Request("automatic", challenger=2))
    settle(client, name, Request("automatic", champion=2, reason="better"))
    settle(client, name, Request("automatic", challenger=3))


def test_automatic_promotion_moves_aliases_stages_and_tags(client, model):
    crowned(client, model)
    view = assert_in_step(client, model)
    assert view["aliases"] == {"champion": 2, "challenger": 3}
    assert view["stages"] == {1: ARCHIVED, 2: PRODUCTION, 3: STAGING, 4: NONE}
    assert view["tags"][2]["promotion"] == "automatic" and view["tags"][2]["previous_champion_version"] == "1"
    assert view["tags"][2]["promotion_reason"] == "better"
    assert view["tags"][1]["retired_by"] == "2" and view["tags"][1]["retirement"] == "automatic"


def test_manual_promotion_of_a_retired_version_removes_its_retired_tags(settings, client, model):
    crowned(client, model)
    info = promotion.promote(settings, model, 1)
    assert info.stage == PRODUCTION and info.aliases == ("champion",)
    view = assert_in_step(client, model)
    assert view["tags"][1]["promotion"] == "manual" and view["tags"][1]["previous_champion_version"] == "2"
    assert view["tags"][1]["promotion_reason"] == "promoted by hand over v2"
    # v2 no longer says how it was promoted: it says how and by whom it was retired.
    assert view["tags"][2] == {"retirement": "manual", "retired_at": view["tags"][2]["retired_at"], "retired_by": "1"}
    assert view["stages"] == {1: PRODUCTION, 2: ARCHIVED, 3: STAGING, 4: NONE}


def test_the_champion_alias_moved_in_mlflow_rewrites_the_stale_tags(client, model):
    """The reported case: the alias moved back to a retired version in the UI."""
    crowned(client, model)
    client.set_registered_model_alias(model, "champion", "1")
    before = registry_view(client, model)
    read = read_roles(client, model)
    assert (read.champion, read.how) == (1, "mlflow-alias") and not read.in_step
    assert registry_view(client, model) == before  # the read wrote nothing
    settled = settle(client, model)
    assert settled.changes[0].startswith("v1 champion (mlflow-alias") and "retiring v2" in settled.changes[0]
    view = assert_in_step(client, model)
    assert view["stages"] == {1: PRODUCTION, 2: ARCHIVED, 3: STAGING, 4: NONE}
    assert view["tags"][1]["promotion"] == "mlflow-alias" and "retired_by" not in view["tags"][1]
    assert view["tags"][2]["retired_by"] == "1" and "promotion" not in view["tags"][2]


def test_production_in_mlflow_makes_the_champion_and_read_sees_it_first(client, model):
    crowned(client, model)
    person_moves_stage(client, model, 4, "Production")
    read = read_roles(client, model)
    assert (read.champion, read.challenger, read.how) == (4, 3, "mlflow-stage")
    assert registry_view(client, model)["aliases"] == {"champion": 2, "challenger": 3}  # nothing written yet
    settle(client, model)
    view = assert_in_step(client, model)
    assert view["aliases"] == {"champion": 4, "challenger": 3}
    assert view["tags"][4]["promotion"] == "mlflow-stage" and view["tags"][4]["previous_champion_version"] == "2"
    # The stage's time is MLflow's own stamp of the transition.
    stamped = client.get_model_version(model, "4").last_updated_timestamp
    assert view["tags"][4]["promoted_at"] == dt.datetime.fromtimestamp(stamped / 1000, dt.UTC).isoformat(
        timespec="seconds"
    )


def test_the_challenger_moved_to_production_stops_being_challenger(client, model):
    crowned(client, model)
    person_moves_stage(client, model, 3, "Production")
    settle(client, model)
    view = assert_in_step(client, model)
    assert view["aliases"] == {"champion": 3}
    assert view["tags"][3]["promotion"] == "mlflow-stage" and "staging" not in view["tags"][3]


def test_staging_in_mlflow_makes_the_challenger_and_frees_the_old_one(client, model):
    crowned(client, model)
    person_moves_stage(client, model, 1, "Staging")  # a retired version, staged again
    settle(client, model)
    view = assert_in_step(client, model)
    assert view["aliases"] == {"champion": 2, "challenger": 1}
    assert view["stages"] == {1: STAGING, 2: PRODUCTION, 3: NONE, 4: NONE}
    assert view["tags"][1]["staging"] == "mlflow-stage" and view["tags"][3] == {}


def test_archiving_the_champion_rolls_back_to_the_one_it_retired(client, model):
    crowned(client, model)
    person_moves_stage(client, model, 2, "Archived")
    assert read_roles(client, model).champion == 1  # served before anything settles
    settled = settle(client, model)
    assert settled.changes == (
        f"champion v2 moved to stage Archived (mlflow-stage, {settled.at})",
        f"v1 champion (mlflow-stage, {settled.at}): rollback: champion v2 was taken out (mlflow-stage, {settled.at})",
    )
    view = assert_in_step(client, model)
    assert view["aliases"] == {"champion": 1, "challenger": 3}
    assert view["tags"][1]["promotion_reason"].startswith("rollback: champion v2 was taken out")
    # v2 was archived by a person, not retired by a successor: nothing may roll back to it.
    assert "retired_by" not in view["tags"][2] and view["tags"][2]["retirement"] == "mlflow-stage"

    person_moves_stage(client, model, 1, "Archived")
    settled = settle(client, model)
    assert settled.champion is None and settled.previous_champion == 1
    view = assert_in_step(client, model)
    assert view["aliases"] == {"challenger": 3} and view["stages"][1] == view["stages"][2] == ARCHIVED
    with pytest.raises(ModelRegistryError, match="no champion: v1 was taken out"):
        registry.resolve_version(client, model, "champion")


def test_archiving_the_first_champion_leaves_no_champion(client, model):
    settle(client, model, Request("manual", champion=1))
    person_moves_stage(client, model, 1, "Archived")
    assert settle(client, model).champion is None
    assert assert_in_step(client, model)["aliases"] == {}


def test_archiving_another_version_changes_no_role(client, model):
    crowned(client, model)
    person_moves_stage(client, model, 4, "Archived")
    person_moves_stage(client, model, 3, "Archived")  # the challenger
    settled = settle(client, model)
    assert (settled.champion, settled.challenger) == (2, None)
    view = assert_in_step(client, model)
    assert view["stages"] == {1: ARCHIVED, 2: PRODUCTION, 3: ARCHIVED, 4: ARCHIVED}
    assert view["tags"][4]["retirement"] == "mlflow-stage" and "retired_by" not in view["tags"][4]
    # Taken out of the archive, a version sheds its retired tags.
    person_moves_stage(client, model, 4, "None")
    settle(client, model)
    assert assert_in_step(client, model)["tags"][4] == {}


def test_stage_transitions_apply_in_the_order_they_happened(client, model):
    crowned(client, model)
    person_moves_stage(client, model, 4, "Production")
    stamped = client.get_model_version(model, "4").last_updated_timestamp
    deadline = time.monotonic() + 5
    while time.time() * 1000 <= stamped:  # MLflow stamps in ms: the next transition must be later
        assert time.monotonic() < deadline
    person_moves_stage(client, model, 3, "Production")
    settle(client, model)
    view = assert_in_step(client, model)
    assert view["aliases"] == {"champion": 3}
    assert view["tags"][3]["previous_champion_version"] == "4" and view["tags"][4]["retired_by"] == "3"
    assert view["tags"][2]["retired_by"] == "4"


def test_an_alias_and_a_stage_moved_in_one_interval_the_alias_wins(client, model):
    crowned(client, model)
    person_moves_stage(client, model, 4, "Production")
    client.set_registered_model_alias(model, "champion", "1")
    settled = settle(client, model)
    assert settled.champion == 1 and settled.how == "mlflow-alias"
    assert any("alias counts as the newer change" in change for change in settled.changes)
    view = assert_in_step(client, model)
    assert view["stages"][4] == ARCHIVED and view["tags"][4]["retired_by"] == "1"


def test_a_registry_from_before_stages_is_adopted_from_its_aliases(client, model):
    """Keel once kept the promoted challenger's alias and marked retired champions by tag only."""
    client.set_registered_model_alias(model, "champion", "2")
    client.set_registered_model_alias(model, "challenger", "2")
    for key, value in {"promotion": "automatic", "promoted_at": "2026-01-02T00:00:00+00:00"}.items():
        client.set_model_version_tag(model, "2", key, value)
    for key, value in {
        "previous_champion": "true",
        "retired_at": "2026-01-02T00:00:00+00:00",
        "retired_by": "2",
    }.items():
        client.set_model_version_tag(model, "1", key, value)
    settled = settle(client, model)
    assert (settled.champion, settled.challenger, settled.how) == (2, None, "automatic")
    view = assert_in_step(client, model)
    assert view["aliases"] == {"champion": 2}
    assert view["stages"] == {1: ARCHIVED, 2: PRODUCTION, 3: NONE, 4: NONE}
    assert "previous_champion" not in view["tags"][1] and view["tags"][1]["retired_by"] == "2"


def test_a_registry_run_on_stages_alone_is_adopted_from_its_stages(client, model):
    person_moves_stage(client, model, 3, "Production")
    person_moves_stage(client, model, 4, "Staging")
    settled = settle(client, model)
    assert (settled.champion, settled.challenger) == (3, 4)
    assert assert_in_step(client, model)["aliases"] == {"champion": 3, "challenger": 4}


def test_a_pending_record_is_left_to_its_writer_until_it_is_stale(client, model):
    crowned(client, model)
    state = read_state(client, model)
    planned = plan(state, Request("manual", champion=4))
    # A writer recorded its intent and moved the alias, then stopped (or is still going).
    pending = Record(**{**planned.record.__dict__, "pending": True, "written_ms": state.read_ms})
    client.set_registered_model_tag(model, RECORD_TAG, pending.to_json())
    client.set_registered_model_alias(model, "champion", "4")
    fresh = settle(client, model)
    assert fresh.in_progress and fresh.champion == 4 and read_roles(client, model).champion == 4
    assert registry_view(client, model)["stages"][4] == NONE  # left alone

    stale = Record(**{**pending.__dict__, "written_ms": state.read_ms - PENDING_S * 1000 - 1})
    client.set_registered_model_tag(model, RECORD_TAG, stale.to_json())
    completed = settle(client, model)
    assert completed.champion == 4 and any("half written" in change for change in completed.changes)
    view = assert_in_step(client, model)
    assert view["tags"][4]["promotion"] == "manual" and view["tags"][2]["retired_by"] == "4"


def test_a_promotion_waits_for_a_change_being_written(client, model):
    crowned(client, model)
    state = read_state(client, model)
    planned = plan(state, Request("manual", champion=4))
    # Pending for another second, as a writer still going would leave it.
    written_ms = int(time.time() * 1000) - PENDING_S * 1000 + 1000
    pending = Record(**{**planned.record.__dict__, "pending": True, "written_ms": written_ms})
    client.set_registered_model_tag(model, RECORD_TAG, pending.to_json())
    settled = settle(client, model, Request("automatic", champion=1, reason="better than v4"))
    assert time.time() * 1000 >= written_ms + PENDING_S * 1000
    assert settled.champion == 1 and settled.previous_champion == 4
    view = assert_in_step(client, model)
    assert view["tags"][4]["retired_by"] == "1" and view["tags"][1]["promotion_reason"] == "better than v4"


def test_a_request_names_a_version_that_exists(client, model):
    with pytest.raises(ModelRegistryError, match=r"has no version 9 \(versions: 1, 2, 3, 4\)"):
        settle(client, model, Request("manual", champion=9))
    with pytest.raises(ValueError, match="promotion how 'by-hand' is not known"):
        Request("by-hand", champion=1)
