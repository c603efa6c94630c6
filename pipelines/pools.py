"""The code location's concurrency pools, made known to the instance before its first runs queue.

Every step that writes a table claims the table's pool, and dagster.yaml counts pools per run
with a limit of one. Dagster's run queue learns a pool when it first dequeues a run that
needs it, and does not limit it in that same pass: on a fresh instance a burst (twelve
landing files at once) would launch together and race to publish. Declaring every pool at
the instance's default limit before the daemon starts closes that gap; `make ui`, the demo
and DagsterService do it.
"""

from __future__ import annotations

import dagster as dg


def table_pools(defs: dg.Definitions) -> set[str]:
    """Every pool a step of the code location claims."""
    pools = set()
    for assets_def in defs.resolve_asset_graph().assets_defs:
        if not assets_def.is_executable:
            continue  # an external asset (landing files, serving) runs no step
        node = assets_def.node_def
        ops = node.iterate_op_defs() if isinstance(node, dg.GraphDefinition) else [node]
        pools |= {op.pool for op in ops if getattr(op, "pool", None)}
    return pools


def ensure_pools(instance: dg.DagsterInstance, pools: set[str]) -> list[str]:
    """Create the pools the instance does not know yet, at its default limit; returns those created."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return []
    known = set(storage.get_concurrency_keys())
    created = sorted(pools - known)
    for pool in created:
        storage.initialize_concurrency_limit_to_default(pool)
    return created


def main() -> None:
    from pipelines.definitions import defs

    with dg.DagsterInstance.get() as instance:
        created = ensure_pools(instance, table_pools(defs))
    print(f"concurrency pools: {len(created)} created" + (f" ({', '.join(created)})" if created else ""))


if __name__ == "__main__":
    main()
