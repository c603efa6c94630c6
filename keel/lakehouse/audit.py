"""The audit of write-audit-publish: checks a staged batch of one event source's events.

Expectations are derived from the EventSource declaration and run as a Great Expectations suite
(keel.lakehouse.expectations, which imports GX at the first audit). Two outcomes carry names GX lacks:
`expect_column_type_to_match_declaration` is checked on the Arrow schema (exact, where pandas dtypes are
not), and `expect_daily_row_count_to_be_between` is GX's expect_column_values_to_be_between over a small
frame of rows per UTC day.

A failing row-level expectation (NULL, range, allowed values, uniqueness) lists its first offending rows: GX's
unexpected index list gives their positions, and the rows' identity and value are read from the Arrow batch,
exactly as stored (pandas would turn NULLs into NaN and integers with NULLs into floats).
"""

from __future__ import annotations

import copy
import math
import re
import statistics
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import date, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from keel.dsl import EventSource
from keel.lakehouse.expectations import expectation_suite, gx_engine, load_gx

_SAMPLE = 5
_EXAMPLES = 20
_EXAMPLES_IN_SUMMARY = 3
_MIN_HISTORY = 3
_RESULT_FORMAT = {"result_format": "BASIC", "partial_unexpected_count": _SAMPLE}
# Only the failing expectations are validated again for their rows, so a passing audit pays nothing for them.
# With the frame's default index, GX's unexpected index list holds row positions and is listed by pandas;
# naming index columns (unexpected_index_column_names) makes GX read every unexpected row with DataFrame.at in a
# Python loop before it keeps the first 20 (measured: 20 s for 300k NULLs against 0.5 s for the whole audit).
_EXAMPLES_FORMAT = {
    "result_format": "SUMMARY",
    "partial_unexpected_count": _EXAMPLES,
    # Otherwise GX spells out every unexpected index as the text of a pandas filter.
    "return_unexpected_index_query": False,
}
_DAILY = "expect_daily_row_count_to_be_between"
# GX's context and validators are shared state, not thread-safe: audits in one process take turns.
_LOCK = threading.Lock()


@dataclass(frozen=True)
class ExpectationOutcome:
    """One expectation's verdict on the batch.

    `sample` holds up to five distinct offending values; it is empty for NULL checks, whose offending value is
    always NULL (or NaN). `examples` holds up to twenty offending rows in batch order, JSON-safe (NaN, inf and
    timestamps as text): the row's event id, or its entity keys and timestamp when the source has no event id or
    the event id is what is wrong, then `column` and `value`; for the daily row count, the `day` and its `rows`.
    """

    expectation: str
    column: str | None
    success: bool
    unexpected_count: int
    detail: str
    sample: list
    examples: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class AuditReport:
    """Every expectation's outcome for one staged batch; publish only if `success`."""

    table: str
    row_count: int
    outcomes: tuple[ExpectationOutcome, ...]

    @property
    def success(self) -> bool:
        return all(o.success for o in self.outcomes)

    @property
    def failures(self) -> tuple[ExpectationOutcome, ...]:
        return tuple(o for o in self.outcomes if not o.success)

    def summary(self) -> str:
        """One line per failing expectation: what failed, how often, and its first offending rows."""
        if self.success:
            return f"all {len(self.outcomes)} expectations passed"
        lines = []
        for o in self.failures:
            line = f"{o.expectation}({o.column or self.table}): {o.detail}"
            # The daily row count's detail names its days already.
            if o.examples and o.expectation != _DAILY:
                line += "; e.g. " + ", ".join(map(_example_text, o.examples[:_EXAMPLES_IN_SUMMARY]))
            lines.append(line)
        return "\n".join(lines)

    def to_metadata(self) -> dict:
        return {
            "table": self.table,
            "success": self.success,
            "row_count": self.row_count,
            "failed": len(self.failures),
            "failures": [asdict(o) for o in self.failures],
            "results": [asdict(o) for o in self.outcomes],
        }


def _example_text(example: dict) -> str:
    """An example row as `key=value` pairs, its offending column last: `event_id=e7 amount=NaN`."""
    pairs = {k: v for k, v in example.items() if k not in ("column", "value")}
    if "column" in example:
        pairs[example["column"]] = example.get("value")
    return " ".join(f"{k}={'NULL' if v is None else v}" for k, v in pairs.items())


def audit_events(
    data: pa.Table,
    source: EventSource,
    *,
    recent_partition_rows: Sequence[int] = (),
    partition_column: str | None = None,
    row_count_tolerance: float = 4.0,
) -> AuditReport:
    """Audit a staged batch against `source`'s declaration and recent partition sizes.

    `recent_partition_rows` are the row counts of recently published days; each UTC day of `partition_column`
    (default: the source's timestamp) in the batch must hold between median / tolerance and median * tolerance rows.
    """
    if not row_count_tolerance >= 1:
        raise ValueError(
            f"audit of {source.table_name!r}: row_count_tolerance {row_count_tolerance!r} must be >= 1 "
            "(e.g. 4.0 allows a day between a quarter and four times the recent median)"
        )
    partition_column = partition_column or source.timestamp
    if {c.name: c.type for c in source.all_columns()}.get(partition_column) not in ("timestamp", "date"):
        raise ValueError(
            f"audit of {source.table_name!r}: partition_column {partition_column!r} is not a timestamp or date "
            f"column of the source (use e.g. {source.timestamp!r})"
        )

    # The default conversion (numpy numbers, Arrow-backed `str`) is near zero-copy;
    # types_mapper=pd.ArrowDtype makes GX's per-batch fingerprint ~20x slower.
    frame = data.to_pandas()
    # GX reports unexpected rows by index label: with this index, a label is the row's position in `data`.
    frame.index = range(len(frame))
    with _LOCK:
        suite = expectation_suite(source)
        batch = gx_engine().events.get_batch(batch_parameters={"dataframe": frame})
        result = batch.validate(suite, result_format=_RESULT_FORMAT)
        by_key = {_key(r): r for r in result.results}
        failing = [e for e in suite.expectations if e.expectation_type in _DETAIL and _failed_on_rows(by_key[_key(e)])]
        positions = _unexpected_positions(batch, failing) if failing else {}

    outcomes = []
    for expectation in suite.expectations:
        key = _key(expectation)
        examples = _row_examples(data, source, key[1], positions.get(key, []))
        outcomes.append(_outcome(by_key[key], key, data, examples))
        if key[0] == "expect_table_columns_to_match_ordered_list":
            outcomes += _type_outcomes(data.schema, source)
    outcomes.append(_daily_rows_outcome(data, partition_column, recent_partition_rows, row_count_tolerance))
    return AuditReport(source.table_name, data.num_rows, tuple(outcomes))


def combine_reports(reports: Sequence[AuditReport]) -> AuditReport:
    """One report for a batch audited in parts (e.g. groups of days): counts add up, and an expectation fails if
    it fails in any part. Uniqueness is only known within each part."""
    if not reports:
        raise ValueError("combine_reports: no reports given (audit at least one part of the batch)")
    if len(reports) == 1:
        return reports[0]
    parts: dict[tuple, list[ExpectationOutcome]] = {}
    for outcome in (o for r in reports for o in r.outcomes):
        parts.setdefault((outcome.expectation, outcome.column), []).append(outcome)
    outcomes = []
    for (kind, column), group in parts.items():
        failed = [o for o in group if not o.success]
        count = sum(o.unexpected_count for o in group)
        counted = [re.fullmatch(r"(\d+) of (\d+) rows (.+)", o.detail) for o in group]
        if all(counted) and len({m[3] for m in counted}) == 1:
            detail = f"{count} of {sum(int(m[2]) for m in counted)} rows {counted[0][3]}"
        elif kind == "expect_table_row_count_to_be_between" and not failed:
            detail = f"{sum(r.row_count for r in reports)} rows"
        else:
            detail = "; ".join(dict.fromkeys(o.detail for o in failed or group))
        sample: list = []
        for value in (v for o in failed for v in o.sample):
            if value not in sample:
                sample.append(value)
        examples = [e for o in failed for e in o.examples][:_EXAMPLES]
        outcomes.append(ExpectationOutcome(kind, column, not failed, count, detail, sample[:_SAMPLE], examples))
    return AuditReport(reports[0].table, sum(r.row_count for r in reports), tuple(outcomes))


# The row-level expectations. combine_reports relies on the "{count} of {rows} rows ..." shape.
_DETAIL = {
    "expect_column_values_to_not_be_null": "{count} of {rows} rows {missing}",
    "expect_column_values_to_be_between": "{count} of {rows} rows outside {low}..{high}",
    "expect_column_values_to_be_in_set": "{count} of {rows} rows not in the {n} allowed values",
    "expect_column_values_to_be_unique": "{count} of {rows} rows have a duplicated value",
}


def _key(item: Any) -> tuple[str, str | None]:
    """An expectation's or a result's (type, column): unique within our suite, whatever order GX returns."""
    if hasattr(item, "expectation_config"):
        return item.expectation_config.type, item.expectation_config.kwargs.get("column")
    return item.expectation_type, getattr(item, "column", None)


def _raised(result: Any) -> bool:
    return result.exception_info.get("raised_exception") is not False


def _failed_on_rows(result: Any) -> bool:
    return not result.success and not _raised(result)


def _unexpected_positions(batch: Any, failing: list) -> dict[tuple[str, str | None], list[int]]:
    """The positions of each failing expectation's first offending rows, from GX's unexpected index list."""
    # A suite binds its expectations; copies leave the cached suite as it is.
    again = load_gx().ExpectationSuite(name="keel-failing-rows", expectations=[copy.copy(e) for e in failing])
    results = batch.validate(again, result_format=_EXAMPLES_FORMAT).results
    return {
        _key(r): [int(i) for i in r.result.get("partial_unexpected_index_list") or []]
        for r in results
        if not _raised(r)
    }


def _row_examples(data: pa.Table, source: EventSource, column: str | None, positions: list[int]) -> list[dict]:
    """The rows at `positions` as {identity..., "column", "value"}, read from the Arrow batch."""
    if not positions or column not in data.column_names:
        return []
    if source.event_id and column != source.event_id:
        identity = [source.event_id]
    else:  # duplicated or NULL ids point at nothing; the keys and timestamp tell the rows apart
        identity = [*source.entity.join_keys, source.timestamp]
    identity = [c for c in identity if c in data.column_names]
    rows = data.select(list(dict.fromkeys([*identity, column]))).take(positions[:_EXAMPLES]).to_pylist()
    return [{**{c: _json_safe(r[c]) for c in identity}, "column": column, "value": _json_safe(r[column])} for r in rows]


def _missing(data: pa.Table, column: str, count: int) -> str:
    """What the not-NULL check's offending values are: GX runs on pandas, where a NaN is missing too."""
    nulls = data.column(column).null_count if column in data.column_names else count
    nans = max(count - nulls, 0)
    if not nans:
        return "NULL"
    return "NaN" if not nulls else f"NULL or NaN ({nulls} NULL, {nans} NaN)"


def _outcome(result: Any, key: tuple[str, str | None], data: pa.Table, examples: list[dict]) -> ExpectationOutcome:
    kind, column = key
    if _raised(result):
        # A failed metric's info is nested under its metric id.
        messages = [i.get("exception_message") for i in result.exception_info.values() if isinstance(i, dict)]
        detail = (
            f"column {column!r} is missing from the batch"
            if column is not None and column not in data.column_names
            else next(filter(None, messages), "GX raised an unknown error")
        )
        return ExpectationOutcome(kind, column, False, 0, f"not checked: {detail}", [])

    res, kwargs, rows = result.result, result.expectation_config.kwargs, data.num_rows
    count = int(res.get("unexpected_count") or 0)
    sample = list(dict.fromkeys(map(_json_safe, res.get("partial_unexpected_list", []))))
    if kind == "expect_table_row_count_to_be_between":
        detail = f"{rows} rows" if result.success else "the batch is empty"
    elif kind == "expect_table_columns_to_match_ordered_list":
        declared, found = kwargs["column_list"], res["observed_value"]
        missing, extra = [c for c in declared if c not in found], [c for c in found if c not in declared]
        sample = missing + extra
        count = len(sample) or len(res.get("details", {}).get("mismatched", []))
        detail = (
            "columns match the declaration"
            if result.success
            else f"missing {missing}, unexpected {extra}"
            if sample
            else f"columns in the wrong order: {found} (declared {declared})"
        )
    else:
        detail = _DETAIL[kind].format(
            count=count,
            rows=rows,
            missing=_missing(data, column, count) if kind == "expect_column_values_to_not_be_null" else "",
            n=len(kwargs.get("value_set") or ()),
            low=_num(kwargs.get("min_value")),
            high=_num(kwargs.get("max_value")),
        )
        if kind == "expect_column_values_to_not_be_null":
            sample = []
    return ExpectationOutcome(kind, column, bool(result.success), count, detail, sample[:_SAMPLE], examples)


_TYPE_FITS = {
    "string": lambda t: pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t),
    "int64": lambda t: pa.types.is_signed_integer(t) or (pa.types.is_unsigned_integer(t) and t.bit_width < 64),
    "float64": pa.types.is_floating,
    "bool": pa.types.is_boolean,
    # A naive timestamp could be in any zone; only a zoned one pins the instant.
    "timestamp": lambda t: pa.types.is_timestamp(t) and t.tz is not None,
    "date": pa.types.is_date,
}


def _type_outcomes(schema: pa.Schema, source: EventSource) -> list[ExpectationOutcome]:
    """Whether each present column converts to its declared type without loss or guessing."""
    outcomes = []
    for col in source.all_columns():
        if col.name in schema.names:
            actual = schema.field(col.name).type
            ok = _TYPE_FITS[col.type](actual)
            detail = f"{actual} {'fits' if ok else 'does not fit'} declared {col.type}"
            outcomes.append(
                ExpectationOutcome(
                    "expect_column_type_to_match_declaration", col.name, ok, 0, detail, [] if ok else [str(actual)]
                )
            )
    return outcomes


def _daily_rows_outcome(data: pa.Table, column: str, history: Sequence[int], tolerance: float) -> ExpectationOutcome:
    def outcome(success: bool, count: int, detail: str, sample: list) -> ExpectationOutcome:
        return ExpectationOutcome(_DAILY, column, success, count, detail, sample[:_SAMPLE], sample[:_EXAMPLES])

    if len(history) < _MIN_HISTORY:
        return outcome(True, 0, f"not enough history ({len(history)} partitions)", [])
    values = data.column(column) if column in data.column_names else pa.nulls(0)
    if not (pa.types.is_timestamp(values.type) or pa.types.is_date(values.type)):
        return outcome(False, 0, f"not checked: {column!r} is missing or not a timestamp/date", [])

    median = statistics.median(history)
    low, high = median / tolerance, median * tolerance
    if pa.types.is_timestamp(values.type):
        # Dropping the zone keeps the UTC instant; a zoned value cast straight to a date lands on its local day.
        values = pc.cast(values, pa.timestamp(values.type.unit))
    per_day = (
        pa.table({"day": pc.cast(values, pa.date32())})
        .filter(pc.is_valid(pc.field("day")))
        .group_by("day")
        .aggregate([([], "count_all")])
        .rename_columns(["day", "rows"])
        .sort_by("day")
        .to_pandas()
    )
    per_day["day"] = per_day["day"].astype(str)
    with _LOCK:
        engine = gx_engine()
        batch = engine.day_counts.get_batch(batch_parameters={"dataframe": per_day})
        result = batch.validate(
            engine.day_suite,
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["day"]},
            expectation_parameters={"min_rows": low, "max_rows": high},
        ).results[0]
    allowed = f"allowed {_num(low)}..{_num(high)}"
    if result.success:
        return outcome(True, 0, f"{len(per_day)} days within {allowed} (recent median {_num(median)})", [])
    bad = [{"day": i["day"], "rows": int(i["rows"])} for i in result.result["unexpected_index_list"]]
    days = "; ".join(f"{b['rows']} rows in {b['day']}" for b in bad[:3])
    more = f" and {len(bad) - 3} more days" if len(bad) > 3 else ""
    return outcome(False, len(bad), f"{days}{more} vs recent median {_num(median)} ({allowed})", bad)


def _num(x: float | None) -> str:
    if x is None:
        return "any"
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"


def _json_safe(value: Any) -> Any:
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if hasattr(value, "item"):  # numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        # JSON has no NaN or infinity; a NaN is not a NULL either.
        return "NaN" if math.isnan(value) else "inf" if value > 0 else "-inf"
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)
