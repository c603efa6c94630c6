"""This project's declarations. The Dagster code location is ``pipelines.definitions``."""

import datetime as dt

from keel.project import Project
from pipelines.entities import user
from pipelines.features import FEATURE_GROUPS
from pipelines.generate import generate, write_files
from pipelines.sources import SOURCES, churn_labels, clicks, signups, transactions

# The shop's history is synthetic and always ends yesterday (pipelines.generate dates it from
# today), so its partitions start where that history starts: a fresh `make demo` fills every one.
# A team with real data declares the fixed day its events begin instead.
HISTORY_DAYS = 90

project = Project(
    name="shop",
    description="An online shop: users sign up, browse, buy, and some churn.",
    sources=SOURCES,
    entities=(user,),
    feature_groups=FEATURE_GROUPS,
    start_date=dt.datetime.now(dt.UTC).date() - dt.timedelta(days=HISTORY_DAYS),
    generate=generate,
    write_files=write_files,
)

__all__ = ["churn_labels", "clicks", "project", "signups", "transactions", "user"]
