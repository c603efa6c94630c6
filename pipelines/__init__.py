"""This project's declarations. The Dagster code location is ``pipelines.definitions``."""

import datetime as dt

from keel.project import Project
from pipelines.entities import user
from pipelines.features import FEATURE_GROUPS
from pipelines.generate import generate, write_files
from pipelines.sources import SOURCES, churn_labels, clicks, signups, transactions

project = Project(
    name="shop",
    description="An online shop: users sign up, browse, buy, and some churn.",
    sources=SOURCES,
    entities=(user,),
    feature_groups=FEATURE_GROUPS,
    start_date=dt.date(2026, 1, 1),
    generate=generate,
    write_files=write_files,
)

__all__ = ["churn_labels", "clicks", "project", "signups", "transactions", "user"]
