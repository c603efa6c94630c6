import datetime as dt
import json
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from pipelines.generate import generate, write_files
from pipelines.sources import SOURCES

START = dt.date(2026, 1, 1)
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)
SMALL = {"days": 45, "users": 120, "seed": 3}


@pytest.fixture(scope="module")
def small():
    return generate(**SMALL)


def _rows(table, *columns):
    return list(zip(*(table[c].to_pylist() for c in columns), strict=True))


def _by_user(table, *columns):
    out = defaultdict(list)
    for user, *values in _rows(table, "user_id", *columns):
        out[user].append(values[0] if len(values) == 1 else tuple(values))
    return out


def _activity(tables):
    """user_id -> sign-up time, and user_id -> times of their clicks and payments."""
    signup = dict(_rows(tables["signups"], "user_id", "event_ts"))
    activity = _by_user(tables["clicks"], "event_ts")
    for user, ts in _rows(tables["transactions"], "user_id", "event_ts"):
        activity[user].append(ts)
    return signup, activity


def test_tables_have_the_declared_schemas(small):
    assert list(small) == [s.name for s in SOURCES]
    for source in SOURCES:
        assert small[source.name].schema.equals(source.arrow_schema()), source.name
        assert small[source.name].num_rows > 0, source.name


def test_values_stay_within_declared_columns(small):
    for source in SOURCES:
        table = small[source.name]
        for column in source.all_columns():
            values = table[column.name]
            if not column.nullable:
                assert values.null_count == 0, (source.name, column.name)
            if column.allowed is not None:
                assert set(values.to_pylist()) <= set(column.allowed), (source.name, column.name)
            if column.min is not None:
                assert pc.min(values).as_py() >= column.min, (source.name, column.name)
                assert pc.max(values).as_py() <= column.max, (source.name, column.name)
    assert 0 < small["signups"]["age"].null_count < small["signups"].num_rows


def test_events_lie_in_the_window_sorted_with_unique_ids(small):
    end = T0 + SMALL["days"] * DAY
    signup = dict(_rows(small["signups"], "user_id", "event_ts"))
    for source in SOURCES:
        table = small[source.name]
        ts = table["event_ts"].to_pylist()
        assert ts[0] >= T0, source.name
        assert ts[-1] < end, source.name
        assert ts == sorted(ts), source.name
        ids = table["event_id"].to_pylist()
        assert len(set(ids)) == len(ids), source.name
        # Nobody acts before they have signed up.
        for user, t in _rows(table, "user_id", "event_ts"):
            assert signup[user] <= t, (source.name, user)


def test_payments_follow_a_checkout_view(small):
    checkouts = defaultdict(list)
    for user, ts, page in _rows(small["clicks"], "user_id", "event_ts", "page"):
        if page == "checkout":
            checkouts[user].append(ts)
    for user, ts in _rows(small["transactions"], "user_id", "event_ts"):
        assert any(ts - dt.timedelta(hours=1) <= c <= ts for c in checkouts[user]), (user, ts)


def test_same_arguments_give_same_tables_and_other_seed_differs(small):
    again = generate(**SMALL)
    other = generate(**{**SMALL, "seed": SMALL["seed"] + 1})
    for name in small:
        assert again[name].equals(small[name]), name
        assert not other[name].equals(small[name]), name


def test_churn_labels_match_brute_force_reference(small):
    signup, activity = _activity(small)
    end = T0 + SMALL["days"] * DAY
    expected = []
    t = T0 + 7 * DAY
    while t + 30 * DAY <= end:
        for user, signed in signup.items():
            recent = [x for x in [*activity[user], signed] if t - 30 * DAY < x <= t]
            if signed <= t and recent:
                churned = not any(t < x <= t + 30 * DAY for x in activity[user])
                expected.append((user, t, churned, t + 30 * DAY))
        t += 7 * DAY
    got = _rows(small["churn_labels"], "user_id", "event_ts", "churned", "label_ts")
    assert sorted(got) == sorted(expected)
    assert {churned for _, _, churned, _ in got} == {True, False}


def _features(tables):
    """Per label, by brute force: clicks in the 7 days and payments in the 30 days up to t,
    and days since the last sign-up, click or payment."""
    signup, activity = _activity(tables)
    clicks = _by_user(tables["clicks"], "event_ts")
    payments = _by_user(tables["transactions"], "event_ts", "amount")
    rows = []
    for user, t in _rows(tables["churn_labels"], "user_id", "event_ts"):
        paid = [amount for ts, amount in payments[user] if t - 30 * DAY < ts <= t]
        last = max([x for x in activity[user] if x <= t] + [signup[user]])
        rows.append((sum(t - 7 * DAY < x <= t for x in clicks[user]), len(paid), sum(paid), (t - last) / DAY))
    return np.log1p(np.array(rows))


def test_churn_is_learnable_on_a_time_split():
    tables = generate(days=60, users=300, seed=11)
    labels = tables["churn_labels"]
    x = _features(tables)
    y = np.array(labels["churned"].to_pylist())
    train = np.array([t <= T0 + 14 * DAY for t in labels["event_ts"].to_pylist()])
    assert 0.1 < y.mean() < 0.3
    model = LogisticRegression(max_iter=1000).fit(x[train], y[train])
    auc = roc_auc_score(y[~train], model.predict_proba(x[~train])[:, 1])
    assert auc > 0.7, f"ROC AUC {auc:.3f}"


def _after(table, boundary):
    return table.filter(pc.greater_equal(table["event_ts"], boundary))


def _share(table, column, value):
    return pc.mean(pc.cast(pc.equal(table[column], value), pa.int8())).as_py()


def _sessions_per_user_day(tables, boundary):
    """Sessions started per (user, day), for users who signed up before the boundary."""
    starts = tables["clicks"].group_by(["user_id", "session_id"]).aggregate([("event_ts", "min")])
    starts = starts.append_column("day", pc.floor_temporal(starts["event_ts_min"], unit="day"))
    counts = starts.group_by(["user_id", "day"]).aggregate([("session_id", "count")])
    joined_late = _after(tables["signups"], boundary)["user_id"]
    counts = counts.filter(pc.invert(pc.is_in(counts["user_id"], joined_late)))
    return counts.sort_by([("user_id", "ascending"), ("day", "ascending")])


def test_drift_changes_only_what_comes_after_the_drift_day():
    base = generate(days=40, users=300, seed=5)
    drifted = generate(days=40, users=300, seed=5, drift_after=20)
    boundary = pa.scalar(T0 + 20 * DAY, pa.timestamp("us", tz="UTC"))
    for name in base:
        before = [t.filter(pc.less(t["event_ts"], boundary)) for t in (base[name], drifted[name])]
        assert before[0].num_rows > 0, name
        assert before[0].equals(before[1]), name
    # Users who joined before the drift keep coming back exactly as often.
    assert _sessions_per_user_day(base, boundary).equals(_sessions_per_user_day(drifted, boundary))

    was, now = ({name: _after(t, boundary) for name, t in run.items()} for run in (base, drifted))
    ratio = pc.mean(now["transactions"]["amount"]).as_py() / pc.mean(was["transactions"]["amount"]).as_py()
    assert ratio > 1.3, f"amount ratio {ratio:.2f}"
    for name, column, value, rise in [
        ("transactions", "merchant_category", "electronics", 0.1),
        ("clicks", "device", "android", 0.05),
        ("signups", "plan", "plus", 0.1),
    ]:
        assert _share(now[name], column, value) > _share(was[name], column, value) + rise, (name, value)
    assert pc.mean(now["clicks"]["dwell_s"]).as_py() > 1.3 * pc.mean(was["clicks"]["dwell_s"]).as_py()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"days": 0}, "days=0"),
        ({"users": 0}, "users=0"),
        ({"users": 2.5}, "users=2.5"),
        ({"seed": -1}, "seed=-1"),
        ({"days": 10, "drift_after": 10}, r"drift_after=10 .*1\.\.9"),
        ({"drift_after": 0}, "drift_after=0"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(**kwargs)


def test_start_must_be_a_date():
    with pytest.raises(TypeError, match="start='2026-01-01'"):
        generate(start="2026-01-01")


def test_write_files_rejects_bad_chunks_and_unknown_tables(small, tmp_path):
    with pytest.raises(ValueError, match="chunk_days=0"):
        write_files(small, tmp_path, chunk_days=0)
    with pytest.raises(ValueError, match="orders"):
        write_files({"orders": small["clicks"]}, tmp_path)


def _read(path, schema):
    if path.suffix == ".parquet":
        return pq.read_table(path)
    if path.suffix == ".csv":
        return pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types=schema))
    return pajson.read_json(path, parse_options=pajson.ParseOptions(explicit_schema=schema))


def test_files_read_back_to_the_same_rows_and_are_byte_identical(small, tmp_path):
    paths = write_files(small, tmp_path / "a", chunk_days=20)
    assert paths == sorted(paths)
    expected_paths = set()
    for source in SOURCES:
        table = small[source.name]
        window = np.array([(t - T0) // DAY // 20 for t in table["event_ts"].to_pylist()])
        for w in np.unique(window):
            first = START + int(w) * 20 * DAY
            ext = {"signups": "parquet", "clicks": "jsonl"}.get(source.name, "csv")
            path = tmp_path / "a" / source.name / f"{source.name}-{first:%Y%m%d}.{ext}"
            expected_paths.add(path)
            schema = source.arrow_schema()
            assert _read(path, schema).cast(schema).equals(table.filter(pa.array(window == w))), path
    assert set(paths) == expected_paths

    first_click = json.loads(next(p for p in paths if p.suffix == ".jsonl").read_text().splitlines()[0])
    assert first_click["event_ts"].endswith("Z")
    again = write_files(generate(**SMALL), tmp_path / "b", chunk_days=20)
    assert [p.relative_to(tmp_path / "b") for p in again] == [p.relative_to(tmp_path / "a") for p in paths]
    for a, b in zip(paths, again, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name
