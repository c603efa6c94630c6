"""Great Expectations for the audit: GX itself, its context and each event source's expectation suite.

GX is imported at the first audit, not with this module: the import alone takes seconds, and the
Dagster code location imports the audit on every load. One ephemeral, in-memory context serves every
audit in the process; a source's suite is derived from its declaration once and cached.
"""

from __future__ import annotations

import os
import warnings
from functools import cache
from typing import Any, NamedTuple

from keel.dsl import EventSource


@cache
def load_gx() -> Any:
    """The great_expectations module, imported once, with what its import changes process-wide undone."""
    # 1.24 has no telemetry client left, but earlier 1.x read this at import; keep it off.
    os.environ["GX_ANALYTICS_ENABLED"] = "False"
    # Leaving this block also restores warnings.showwarning, which GX's import replaces process-wide
    # (logging.captureWarnings(True)), sending every later warning to a logger with only a NullHandler.
    with warnings.catch_warnings():
        # GX 1.24's file path connector imports the stdlib's deprecated sre_* modules.
        warnings.filterwarnings("ignore", "module 'sre_(constants|parse)' is deprecated", DeprecationWarning)
        import great_expectations
    return great_expectations


class GxEngine(NamedTuple):
    """What the audit uses of GX's context: its batch definitions and the daily row-count suite."""

    events: Any  # batch definitions taking one whole dataframe
    day_counts: Any
    day_suite: Any


@cache
def gx_engine() -> GxEngine:
    """The process's one ephemeral, in-memory GX context, made at the first audit."""
    gx = load_gx()
    from great_expectations.data_context.types import base

    context = gx.get_context(
        mode="ephemeral",
        project_config=base.DataContextConfig(
            store_backend_defaults=base.InMemoryStoreBackendDefaults(),
            analytics_enabled=False,
            # tqdm bars would otherwise land in every Dagster run's stderr.
            progress_bars=base.ProgressBarsConfig(globally=False),
        ),
    )
    pandas = context.data_sources.add_pandas("keel")
    events, day_counts = (
        pandas.add_dataframe_asset(name).add_batch_definition_whole_dataframe("batch")
        for name in ("staged_events", "day_counts")
    )
    # Bounds are parameters so that one suite serves every history.
    day_suite = gx.ExpectationSuite(name="keel-daily-row-count")
    day_suite.add_expectation(
        gx.expectations.ExpectColumnValuesToBeBetween(
            column="rows", min_value={"$PARAMETER": "min_rows"}, max_value={"$PARAMETER": "max_rows"}
        )
    )
    return GxEngine(events, day_counts, day_suite)


@cache
def expectation_suite(source: EventSource) -> Any:
    """The suite ``source``'s declaration implies: rows, the column list, NULLs, ranges, allowed values, unique ids."""
    gx_engine()  # a suite looks up GX's current context on every add_expectation
    gx = load_gx()
    ex = gx.expectations
    suite = gx.ExpectationSuite(name=f"keel-{source.name}")
    columns = source.all_columns()
    suite.add_expectation(ex.ExpectTableRowCountToBeBetween(min_value=1))
    suite.add_expectation(ex.ExpectTableColumnsToMatchOrderedList(column_list=[c.name for c in columns]))
    # all_columns() declares event id, keys and timestamp nullable=False, so this covers them.
    for col in columns:
        if not col.nullable:
            suite.add_expectation(ex.ExpectColumnValuesToNotBeNull(column=col.name))
    for col in columns:
        if col.min is not None or col.max is not None:
            suite.add_expectation(
                ex.ExpectColumnValuesToBeBetween(column=col.name, min_value=col.min, max_value=col.max)
            )
        if col.allowed is not None:
            suite.add_expectation(ex.ExpectColumnValuesToBeInSet(column=col.name, value_set=list(col.allowed)))
    if source.event_id:
        suite.add_expectation(ex.ExpectColumnValuesToBeUnique(column=source.event_id))
    return suite
