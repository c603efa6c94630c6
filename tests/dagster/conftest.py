"""Fixtures of the Dagster tests: a Dagster instance per test, and the payments ingest assets."""

import dagster as dg
import pytest

from assets.raw_events import raw_event_definitions
from keel.project import Project
from resources import resource_definitions
from tests.factories.dagster_runs import START


@pytest.fixture
def instance(keel_home):
    """A Dagster instance for one test, kept under its KEEL_HOME."""
    with dg.instance_for_test(temp_dir=str(keel_home / "dagster")) as inst:
        yield inst


@pytest.fixture
def ingest_defs(payments, settings) -> dg.Definitions:
    """The raw event assets of a payments project starting at START, with the resources."""
    project = Project(name="test", sources=(payments,), start_date=START)
    return dg.Definitions.merge(raw_event_definitions(project), resource_definitions(settings))
