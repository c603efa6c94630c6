"""Batch ingestion: reading event files, validating them row by row (reason codes), settling re-sent ids, landing them through write-audit-publish."""
