"""A small project for CLI tests (KEEL_PROJECT=tests.keel.feature_project): payments and two groups."""

from keel.dsl import Entity
from keel.project import Project
from tests.conftest import payments_source
from tests.keel.test_store import START, groups_for

buyer = Entity(name="buyer", join_keys={"user_id": "string"})
payments = payments_source(buyer)
spend, spend_ratio = groups_for(payments)
project = Project(name="cli", sources=(payments,), start_date=START, feature_groups=(spend, spend_ratio))
