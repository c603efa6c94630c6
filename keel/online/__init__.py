"""The online store: its interface and backends (Redis, SQLite), lookups, syncing from the lakehouse, online/offline consistency."""

# Each backend adds itself to keel.online.store.BACKENDS, where OnlineStore.from_settings finds it.
from keel.online import redis_backend, sqlite_backend  # noqa: F401
