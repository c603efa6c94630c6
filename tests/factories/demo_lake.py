"""The demo's generated sources written straight into an embedded lakehouse (no ingest), for engine tests."""

from pathlib import Path

from keel.config import Settings
from keel.features.training_sets import OfflineStore
from keel.project import load_project
from pipelines.generate import generate


def demo_store(home: Path, *, days: int, users: int, seed: int = 5, **env: str) -> tuple[OfflineStore, dict]:
    """An offline store over ``home`` holding ``days`` of the demo's sources, and the tables written."""
    settings = Settings.from_env({"KEEL_HOME": str(home), "KEEL_CODE_VERSION": "test", **env})
    store = OfflineStore.from_settings(settings)
    tables = generate(days=days, users=users, seed=seed)
    for source in load_project("pipelines").sources:
        name = source.table_name
        store.lake.ensure_table(
            name, source.arrow_schema(), day_column=source.timestamp, bucket_column=source.key_columns[0]
        )
        store.lake.table(name).append(tables[source.name])
    return store, tables
