"""Entities of the demo domain: an online shop."""

from keel.dsl import Entity

user = Entity(
    name="user",
    join_keys={"user_id": "string"},
    description="A registered shopper.",
)
