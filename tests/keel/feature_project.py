"""A small project for CLI tests (KEEL_PROJECT=tests.keel.feature_project): payments and two groups."""

from keel.dsl import Column, Entity, EventSource
from keel.project import Project
from tests.keel.test_store import START, groups_for

buyer = Entity(name="buyer", join_keys={"user_id": "string"})
payments = EventSource(
    name="payments",
    entity=buyer,
    columns=(
        Column("amount", "float64", nullable=False, min=0, max=10_000),
        Column("currency", "string", nullable=False, allowed=("EUR", "USD")),
        Column("items", "int64", min=1, max=100),
        Column("is_refund", "bool", nullable=False),
    ),
)
spend, spend_ratio = groups_for(payments)
project = Project(name="cli", sources=(payments,), start_date=START, feature_groups=(spend, spend_ratio))
