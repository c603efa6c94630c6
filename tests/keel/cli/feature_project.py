"""A small project for CLI tests (KEEL_PROJECT=tests.keel.cli.feature_project): payments and two groups."""

from keel.dsl import Entity
from keel.project import Project
from tests.factories.features import START, groups_for
from tests.factories.payments import payments_source

buyer = Entity(name="buyer", join_keys={"user_id": "string"})
payments = payments_source(buyer)
spend, spend_ratio = groups_for(payments)
project = Project(name="cli", sources=(payments,), start_date=START, feature_groups=(spend, spend_ratio))
