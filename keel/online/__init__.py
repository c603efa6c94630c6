"""The online store: its interface and backends (Redis, SQLite), lookups, syncing from the lakehouse, online/offline consistency."""
