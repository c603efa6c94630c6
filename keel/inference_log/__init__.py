"""The inference log: what serving answered, written to its sinks and loaded into the lakehouse."""
