"""This project's declarations. The Dagster code location is ``pipelines.definitions``."""

from pipelines.entities import user
from pipelines.sources import SOURCES, churn_labels, clicks, signups, transactions

ENTITIES = (user,)

__all__ = ["ENTITIES", "SOURCES", "churn_labels", "clicks", "signups", "transactions", "user"]
