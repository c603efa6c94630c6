"""One-row XGBoost scoring through the C API equals the booster's own inplace_predict."""

import logging

import numpy as np
import pandas as pd
import pytest
import xgboost

from serving.booster import OneRow
from serving.models import CATEGORY, NUMBER, xgboost_scorer

ROWS = 400


def numeric_data(rng):
    x = rng.normal(size=(ROWS, 6))
    x[rng.random(x.shape) < 0.1] = np.nan  # missing values take each split's default branch
    y = (np.nan_to_num(x[:, 0]) + np.nan_to_num(x[:, 1]) > 0).astype(int)
    return x, y


def test_one_row_equals_inplace_predict_with_missing_values():
    rng = np.random.default_rng(1)
    x, y = numeric_data(rng)
    booster = xgboost.XGBClassifier(n_estimators=30, max_depth=4, nthread=1).fit(x, y).get_booster()
    fast = OneRow.for_booster(booster, 6)
    assert fast is not None
    for row in x[:100]:
        expected = booster.inplace_predict(row.reshape(1, -1), validate_features=False)
        assert np.array_equal(fast.try_score(row.tolist()), expected.astype(np.float64))


def test_multiclass_gives_one_probability_per_class():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(ROWS, 4))
    y = np.digitize(x[:, 0], [-0.5, 0.5])
    booster = xgboost.XGBClassifier(n_estimators=10, max_depth=3, nthread=1).fit(x, y).get_booster()
    fast = OneRow.for_booster(booster, 4)
    got = fast.try_score(x[0].tolist())
    assert got.shape == (3,)
    assert np.array_equal(got, booster.inplace_predict(x[:1]).reshape(-1).astype(np.float64))
    assert got.sum() == pytest.approx(1.0, abs=1e-6)


def test_served_scorer_one_row_equals_many_rows_with_categories():
    """The server's scorer: the one-row path and the matrix path give the same scores, unseen categories included."""
    rng = np.random.default_rng(3)
    city = rng.choice(["oslo", "lima", "pune"], ROWS)
    amount = rng.gamma(2.0, 10.0, ROWS)
    y = ((city == "lima") | (amount > 30)).astype(int)
    frame = pd.DataFrame({"city": pd.Categorical(city), "amount": amount})
    model = xgboost.XGBClassifier(n_estimators=20, max_depth=3, enable_categorical=True, tree_method="hist")
    model.fit(frame, y)
    score = xgboost_scorer(model, ["city", "amount"], [CATEGORY, NUMBER])
    rows = [[c, float(a)] for c, a in zip(city[:50], amount[:50], strict=True)]
    rows += [["tokyo", 12.0], [None, 50.0], ["lima", None]]
    together = score(rows)
    alone = np.concatenate([score([row]) for row in rows])
    assert np.array_equal(together, alone)
    offline = model.predict_proba(frame.iloc[:50])[:, 1]
    assert np.allclose(together[:50], offline, rtol=0, atol=1e-7)


def test_a_busy_buffer_or_a_failed_check_falls_back_to_inplace_predict(monkeypatch, caplog):
    rng = np.random.default_rng(4)
    x, y = numeric_data(rng)
    model = xgboost.XGBClassifier(n_estimators=10, max_depth=3, nthread=1).fit(x, y)
    fast = OneRow.for_booster(model.get_booster(), 6)
    with fast._lock:  # another thread is scoring
        assert fast.try_score(x[0].tolist()) is None

    monkeypatch.setattr(OneRow, "try_score", lambda self, values: np.array([0.5]))
    with caplog.at_level(logging.WARNING, logger="keel.serving"):
        assert OneRow.for_booster(model.get_booster(), 6) is None
    assert "fast path off" in caplog.text
    score = xgboost_scorer(model, [f"x{i}" for i in range(6)], [NUMBER] * 6)
    expected = model.get_booster().inplace_predict(x[:1]).astype(np.float64)
    assert np.array_equal(score([x[0].tolist()]), expected)
