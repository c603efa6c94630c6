"""A model's reference sample and logged traffic, with a shift to plant, for the drift tests."""

import datetime as dt
import json

import numpy as np
import pyarrow as pa

from keel.models.reference import HOLDOUT, LABEL, LABEL_TS, PREDICTION, SPLIT, TRAIN

START = dt.datetime(2026, 5, 1, tzinfo=dt.UTC)
CURRENCIES = np.array(["EUR", "USD", "GBP"])


def reference(n: int = 3000, seed: int = 1) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table(
        {
            "amount": rng.normal(50, 10, n),
            "items": rng.poisson(3, n).astype(np.int64),
            "currency": CURRENCIES[rng.choice(3, n, p=[0.5, 0.3, 0.2])],
            "is_new": rng.random(n) < 0.3,
            LABEL: rng.random(n) < 0.2,
            LABEL_TS: pa.array([START - dt.timedelta(days=30)] * n, pa.timestamp("us", tz="UTC")),
            SPLIT: np.where(np.arange(n) % 4 == 0, HOLDOUT, TRAIN),
            PREDICTION: rng.beta(2, 8, n),
        }
    )


def traffic(n: int, seed: int, *, shift: float = 0.0, currency_p=(0.5, 0.3, 0.2), version: int = 1) -> pa.Table:
    """Logged answers as the inference log holds them: JSON feature vectors in the model's order."""
    rng = np.random.default_rng(seed)
    amount = rng.normal(50 + shift, 10, n)
    items = rng.poisson(3, n)
    currency = CURRENCIES[rng.choice(3, n, p=currency_p)]
    is_new = rng.random(n) < 0.3
    features = [
        json.dumps({"amount": float(a), "items": int(i), "currency": str(c), "is_new": bool(b)})
        for a, i, c, b in zip(amount, items, currency, is_new, strict=True)
    ]
    return pa.table(
        {
            "ts": pa.array([START + dt.timedelta(seconds=i) for i in range(n)], pa.timestamp("us", tz="UTC")),
            "version": pa.array([version] * n, pa.int64()),
            "features": features,
            "prediction": rng.beta(2, 8, n),
        }
    )
