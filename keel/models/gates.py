"""The promotion gates: what a newly trained challenger must pass before it may be compared
with the champion and promoted.

A challenger passes when its hold-out metric reaches the floor (``DEFAULT_FLOORS`` by metric,
unless the model is given its own), no feature is NULL in every training row, and its
hold-out predictions are finite and not constant (within [0, 1] for a classifier). The
train job records the verdict as the blocking check ``gates`` of ``models/<name>_challenger``;
``keel.models.promotion.promote_if_better`` rejects a challenger that failed them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from keel.models.spec import METRICS

if TYPE_CHECKING:
    from keel.models.spec import ModelSpec
    from keel.models.training import TrainResult

# The hold-out metric a challenger must reach before it may be promoted, per metric; a
# metric without an entry has no floor unless the model is given one.
DEFAULT_FLOORS = {"roc_auc": 0.6, "average_precision": 0.1, "accuracy": 0.5, "r2": 0.0}


def metric_floor(spec: ModelSpec, floors: Mapping[str, float] | None = None) -> float | None:
    """The gate's metric floor for ``spec``: ``floors[spec.name]`` when given, else DEFAULT_FLOORS by metric."""
    return dict(floors or {}).get(spec.name, DEFAULT_FLOORS.get(spec.metric))


def describe_gates(spec: ModelSpec, floor: float | None) -> str:
    """The gates in one sentence, as the ``gates`` check describes them."""
    return (
        f"Promotion gates for '{spec.name}': hold-out {spec.metric} "
        f"{'>=' if METRICS[spec.metric].higher_is_better else '<='} {floor}, no feature NULL in every "
        "training row, predictions finite and not constant (within [0, 1] for a classifier)."
    )


def gate_outcomes(spec: ModelSpec, result: TrainResult, floor: float | None) -> dict[str, tuple[bool, str]]:
    """Each gate's verdict and a sentence saying why."""
    value = float(result.metrics.get(spec.metric, float("nan")))
    if floor is None:
        metric_gate = (bool(np.isfinite(value)), f"{spec.metric}={value:.6g} (no floor declared)")
    else:
        higher = METRICS[spec.metric].higher_is_better
        ok = bool(np.isfinite(value)) and (value >= floor if higher else value <= floor)
        metric_gate = (ok, f"hold-out {spec.metric}={value:.6g}, needs {'>=' if higher else '<='} {floor:g}")

    table = result.training_set.table
    empty = [f for f in result.features if table.column(f).null_count == table.num_rows]
    null_gate = (not empty, f"features NULL in every training row: {', '.join(empty)}" if empty else "none all-NULL")

    p = np.asarray(result.predictions, dtype=np.float64)
    finite = bool(np.isfinite(p).all()) and p.size > 0
    std = float(np.std(p)) if finite else float("nan")
    low, high = (float(p.min()), float(p.max())) if finite else (float("nan"), float("nan"))
    in_range = spec.task != "classification" or (low >= 0.0 and high <= 1.0)
    sane = finite and std > 0 and in_range
    prediction_gate = (
        sane,
        f"hold-out predictions: std={std:.4g}, min={low:.4g}, max={high:.4g}"
        + (
            ""
            if sane
            else " (must be finite, not constant" + (", within [0, 1])" if spec.task != "regression" else ")")
        ),
    )
    return {"metric_floor": metric_gate, "no_all_null_feature": null_gate, "prediction_distribution": prediction_gate}


def gates_verdict(gates: Mapping[str, tuple[bool, str]]) -> tuple[bool, str]:
    """Whether every gate passed, and why not: the failed gates' sentences."""
    failed = [name for name, (ok, _) in gates.items() if not ok]
    return not failed, "all gates passed" if not failed else "; ".join(gates[n][1] for n in failed)
