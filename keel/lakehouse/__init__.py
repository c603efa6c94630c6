"""The lakehouse: Iceberg tables (time travel, schema evolution), write-audit-publish on branches, the audit suites, maintenance."""
