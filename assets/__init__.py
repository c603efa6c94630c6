"""Asset factories: declarations in, Dagster assets and checks out."""
