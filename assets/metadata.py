"""Dagster metadata built from engine results: previews, audit tables."""

from __future__ import annotations

import dagster as dg
import pyarrow as pa

from keel.lakehouse.audit import AuditReport


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(value) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def table_preview(data: pa.Table, *, rows: int = 10, sort_by: str | None = None) -> dg.MetadataValue:
    """The first rows of an Arrow table as a Markdown table for the UI."""
    if sort_by and data.num_rows:
        data = data.sort_by(sort_by)
    head = data.slice(0, rows).to_pylist()
    return dg.MetadataValue.md(markdown_table(data.column_names, [list(r.values()) for r in head]))


def audit_examples(report: AuditReport) -> str:
    """Markdown: for each failing expectation with offending rows, its detail and a table of its examples."""
    sections = []
    for o in report.failures:
        if o.examples:
            header = list(dict.fromkeys(k for example in o.examples for k in example))
            rows = [["" if k not in e else "NULL" if e[k] is None else e[k] for k in header] for e in o.examples]
            sections += [f"**{o.expectation}({o.column or report.table})**: {o.detail}", markdown_table(header, rows)]
    if sections:
        return "\n\n".join(sections)
    return "all expectations passed" if report.success else "no failing expectation points at rows"


def audit_metadata(report: AuditReport, branch: str) -> dict:
    """Check metadata: counts, the failing expectations as a table, their offending rows, and every result as JSON."""
    failures = [[o.expectation, o.column or "", o.unexpected_count, o.detail, o.sample] for o in report.failures]
    return {
        "branch": branch,
        "rows_audited": report.row_count,
        "expectations": len(report.outcomes),
        "failed_expectations": len(report.failures),
        "failures": dg.MetadataValue.md(
            markdown_table(["expectation", "column", "unexpected", "detail", "sample"], failures)
            if failures
            else "all expectations passed"
        ),
        "examples": dg.MetadataValue.md(audit_examples(report)),
        "results": dg.MetadataValue.json(report.to_metadata()),
    }


def audit_check_result(report: AuditReport, branch: str) -> dg.AssetCheckResult:
    """The blocking audit check's verdict: failing expectations, counts and offending rows in its metadata."""
    return dg.AssetCheckResult(
        passed=report.success,
        severity=dg.AssetCheckSeverity.ERROR,
        description=report.summary(),
        metadata=audit_metadata(report, branch),
    )


def shard_metadata(report) -> dict:
    """How a sharded computation (keel.compute.ShardReport) ran: shards, engine, workers, memory, time per shard."""
    if report is None:
        return {}
    rows = [[t.label, t.worker, f"{t.seconds:.2f}", f"{t.peak_rss / 2**20:.0f}"] for t in report.tasks]
    return {
        "shards": report.shards,
        "compute": report.engine,
        "workers_used": len(report.workers),
        "peak_memory_mib": round(report.peak_rss / 2**20, 1),
        "slowest_shard_s": round(max((t.seconds for t in report.tasks), default=0.0), 2),
        "shard_tasks": dg.MetadataValue.md(markdown_table(["shard", "worker", "seconds", "peak memory (MiB)"], rows)),
    }
