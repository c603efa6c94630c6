"""Asset factories: declarations in, Dagster assets and checks out."""

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg


@contextmanager
def single_run_backfills() -> Iterator[None]:
    """Define assets with ``BackfillPolicy.single_run()`` without Dagster's beta notice.

    A partition range as one run is a deliberate choice here (one branch, one audit, one
    publish per range); Dagster still labels the parameter beta and would say so per asset.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Parameter `backfill_policy`", category=dg.BetaWarning)
        yield
