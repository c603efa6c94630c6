"""A small project for online CLI tests (KEEL_PROJECT=tests.keel.cli.online_project): payments, two online groups."""

from keel.dsl import Entity
from keel.project import Project
from tests.factories.features import START, online_groups
from tests.factories.payments import payments_source

buyer = Entity(name="buyer", join_keys={"user_id": "string"})
payments = payments_source(buyer)
# A TTL of ten years keeps the March 2026 test values from expiring on the wall clock.
spend, spend_ratio = online_groups(payments, ttl="3650d")
project = Project(name="online", sources=(payments,), start_date=START, feature_groups=(spend, spend_ratio))
