"""Asset factories: declarations in, Dagster assets and checks out."""

import warnings

import dagster as dg

# Partitioned assets here run a partition range as one run (BackfillPolicy.single_run), which
# Dagster still labels beta; that choice is deliberate, so its notice is not repeated per asset.
warnings.filterwarnings("ignore", message=r"Parameter `backfill_policy`", category=dg.BetaWarning)
