"""Deterministic demo data for the shop domain: sign-ups, clicks, transactions, churn labels.

Users sign up over the window; each has a latent engagement (expected sessions a day) that
wanders around a plan-dependent baseline. Some users start to fade, with a hazard that rises
for low engagement, the free plan and recent refunds; a fading user's engagement decays for
two to three weeks before they leave for good. Churn labels are then computed from the
activity the tables actually contain, as a data team would label it.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipelines.sources import (
    COUNTRIES,
    CURRENCIES,
    DEVICES,
    MERCHANT_CATEGORIES,
    PAGES,
    PLANS,
    SOURCES,
)

DAY_US = 86_400_000_000
LABEL_EVERY_DAYS = 7
LABEL_HORIZON_DAYS = 30
FORMATS = {"signups": "parquet", "clicks": "jsonl", "transactions": "csv", "churn_labels": "csv"}
ID_PREFIXES = {"signups": "s-", "clicks": "c-", "transactions": "t-", "churn_labels": "l-"}

COUNTRY_P = (0.30, 0.12, 0.11, 0.08, 0.06, 0.06, 0.04, 0.08, 0.10, 0.05)
COUNTRY_CURRENCY = np.array(
    [CURRENCIES.index(c) for c in ("USD", "GBP", "EUR", "EUR", "EUR", "EUR", "EUR", "BRL", "INR", "JPY")]
)
DEVICE_P, DEVICE_P_DRIFT = (0.38, 0.32, 0.30), (0.25, 0.58, 0.17)
PLAN_P, PLAN_P_DRIFT = (0.76, 0.17, 0.07), (0.52, 0.41, 0.07)
PLAN_SESSIONS = np.array([1.0, 1.8, 2.6])
PLAN_CONVERSION = np.array([0.35, 0.45, 0.55])
PLAN_HAZARD = np.array([1.4, 0.7, 0.45])
INITIAL_COHORT = 0.4
NEVER = np.iinfo(np.int64).max // 2
# Daily hazard of starting to fade for an average free user, and how fast fading goes.
FADE_HAZARD, FADE = 0.0065, 0.8
REFUND_RATE = 0.02
# Page mix of sessions that do not buy; buying sessions end on cart -> checkout.
PAGE_P = (0.24, 0.22, 0.32, 0.09, 0.02, 0.07, 0.04)
CATEGORY_P = (0.26, 0.12, 0.20, 0.06, 0.10, 0.14, 0.12)
CATEGORY_P_DRIFT = (0.20, 0.30, 0.15, 0.05, 0.08, 0.11, 0.11)
CATEGORY_MEDIAN = np.log([35.0, 180.0, 60.0, 320.0, 25.0, 70.0, 18.0])
CATEGORY_SIGMA = np.array([0.6, 0.8, 0.7, 0.7, 0.6, 0.8, 0.5])
# Activity by UTC hour: quiet nights, a lunch bump and an evening peak.
HOUR_P = np.array([2, 1, 1, 1, 1, 2, 3, 5, 6, 6, 6, 7, 8, 7, 6, 6, 6, 7, 9, 10, 10, 9, 6, 4], float)
HOUR_P /= HOUR_P.sum()


def generate(
    days: int = 90,
    users: int = 1000,
    seed: int = 7,
    start: dt.date = dt.date(2026, 1, 1),
    drift_after: int | None = None,
) -> dict[str, pa.Table]:
    """Tables of the demo sources over [start, start + days), keyed by source name.

    Every random draw comes from a stream keyed by (seed, purpose, day), so a run with
    ``drift_after=N`` has exactly the rows of a run without drift before day N. Whether a
    user is active on a day is drawn from that user's own uniforms, so users who joined
    before the drift keep their activity after it, and labels observed before day N match.
    """
    _check_int("days", days, 1, "use the number of days to simulate, e.g. days=90")
    _check_int("users", users, 1, "use the number of users to simulate, e.g. users=1000")
    _check_int("seed", seed, 0, "use a non-negative integer, e.g. seed=7")
    if not isinstance(start, dt.date) or isinstance(start, dt.datetime):
        raise TypeError(f"start={start!r} is not a date (use e.g. start=datetime.date(2026, 1, 1))")
    in_window = isinstance(drift_after, int) and not isinstance(drift_after, bool) and 1 <= drift_after < days
    if drift_after is not None and not in_window:
        raise ValueError(
            f"drift_after={drift_after!r} is not a day inside the window of {days} days "
            f"(use an integer within 1..{days - 1}, or None for no drift)"
        )
    drift_day = days if drift_after is None else drift_after
    start_us = (start - dt.date(1970, 1, 1)).days * DAY_US
    people = _users(_rng(seed, 0, 0), users, days, drift_day, start_us)

    click_parts, txn_parts, n_sessions_so_far = [], [], 0
    for day in range(days):
        n_sessions, n_buys, refunds = _live_one_day(_rng(seed, 1, day), people, day)
        clicks, txns = _sessions(
            _rng(seed, 2, day),
            _rng(seed, 3, day),
            people,
            day,
            day >= drift_day,
            start_us + day * DAY_US,
            n_sessions,
            n_buys,
            refunds,
            n_sessions_so_far,
        )
        n_sessions_so_far += int(n_sessions.sum())
        click_parts.append(clicks)
        txn_parts.append(txns)
    # Sessions running past midnight of the last day would fall outside every partition.
    end_us = start_us + days * DAY_US
    clicks, txns = (
        {k: v[part["ts"] < end_us] for k, v in part.items()} for part in map(_concat, (click_parts, txn_parts))
    )
    labels = _churn_labels(people["signup_us"], clicks, txns, start_us, days)

    strings = {
        "device": DEVICES,
        "country": COUNTRIES,
        "plan": PLANS,
        "page": PAGES,
        "currency": CURRENCIES,
        "merchant_category": MERCHANT_CATEGORIES,
    }
    columns = {
        "signups": {
            **people,
            "user": np.arange(users),
            "ts": people["signup_us"],
            "age": pa.array(people["age"], mask=~people["age_known"]),
        },
        "clicks": {**clicks, "session_id": _ids("sess-", n_sessions_so_far, 8).take(clicks["session"])},
        "transactions": txns,
        "churn_labels": labels,
    }
    user_ids = _ids("u", users, max(5, len(str(users - 1))))
    return {s.name: _table(s, columns[s.name], strings, user_ids) for s in SOURCES}


def _users(rng, users, days, drift_day, start_us) -> dict[str, np.ndarray]:
    """Who the users are, when they join, and their starting engagement."""
    signup_day = np.where(rng.random(users) < INITIAL_COHORT, 0, rng.integers(0, days, users))
    signup_s = _time_of_day(rng, users)
    drifted = signup_day >= drift_day
    country = _pick(rng.random(users), COUNTRY_P)
    u_device, u_plan = rng.random(users), rng.random(users)
    plan = np.where(drifted, _pick(u_plan, PLAN_P_DRIFT), _pick(u_plan, PLAN_P))
    log_base = np.log(PLAN_SESSIONS[plan]) + rng.normal(0.0, 0.5, users)
    people = {
        "signup_day": signup_day,
        "signup_s": signup_s,
        "signup_us": start_us + signup_day * DAY_US + np.round(signup_s * 1e6).astype(np.int64),
        "country": country,
        "device": np.where(drifted, _pick(u_device, DEVICE_P_DRIFT), _pick(u_device, DEVICE_P)),
        "plan": plan,
        "age": np.clip(16 + rng.gamma(4.0, 6.5, users), 16, 100).astype(np.int64),
        "age_known": rng.random(users) >= 0.07,
        "log_base": log_base,
        "log_engagement": log_base + rng.normal(0.0, 0.3, users),
        "fade_len": rng.integers(14, 22, users),
        "churn_day": np.full(users, NEVER),
        "last_refund_day": np.full(users, -NEVER),
    }
    # The initial cohort are existing customers, so some are already on their way out.
    faded = rng.integers(0, people["fade_len"])
    fading = (signup_day == 0) & (rng.random(users) < 0.16)
    people["churn_day"][fading] = (people["fade_len"] - faded)[fading]
    people["log_engagement"][fading] += np.log(FADE) * faded[fading]
    return people


def _live_one_day(rng, people, day):
    """Sessions, purchases and refunds per user today; then move engagement and churn on.

    Counts come from inverse CDFs of per-user uniforms, so a user's day depends on their
    own state only, however many sessions everybody else has.
    """
    users = len(people["plan"])
    noise = rng.standard_normal(users)
    u_fade, u_sessions, u_buys, u_refund = rng.random((4, users))
    plan, churn_day, log_engagement = people["plan"], people["churn_day"], people["log_engagement"]
    active = (people["signup_day"] <= day) & (churn_day > day)
    engagement = np.exp(log_engagement)
    # ppf(0) is -1: a uniform of exactly 0 still means no sessions.
    from scipy import stats  # here: every Dagster run imports this module, few generate

    n_sessions = np.maximum(stats.poisson.ppf(u_sessions, engagement), 0).astype(np.int64) * active
    n_buys = np.maximum(stats.binom.ppf(u_buys, n_sessions, PLAN_CONVERSION[plan]), 0).astype(np.int64)
    refunds = (n_buys > 0) & (u_refund < 1 - (1 - REFUND_RATE) ** n_buys)
    people["last_refund_day"][refunds] = day

    fading = churn_day < NEVER
    hazard = (
        FADE_HAZARD
        * PLAN_HAZARD[plan]
        * np.where(people["last_refund_day"] >= day - 30, 3.0, 1.0)
        * np.clip(1 / engagement, 0.25, 4.0) ** 0.8
    )
    starts_fading = active & ~fading & (u_fade < hazard)
    churn_day[starts_fading] = day + people["fade_len"][starts_fading]
    people["log_engagement"] = np.where(
        fading | starts_fading,
        log_engagement + np.log(FADE),
        log_engagement + 0.15 * (people["log_base"] - log_engagement) + 0.25 * noise,
    )
    return n_sessions, n_buys, refunds


def _sessions(rs, rt, people, day, is_drift, day_us, n_sessions, n_buys, refunds, first_session):
    """One day's page views and payments, given each user's session and purchase counts."""
    user = np.repeat(np.arange(len(n_sessions)), n_sessions)
    n = len(user)
    rank = np.arange(n) - np.repeat(np.cumsum(n_sessions) - n_sessions, n_sessions)
    buys = rank < n_buys[user]
    # Nobody browses before they have signed up on their sign-up day.
    start_s = _time_of_day(rs, n)
    lo = np.where(people["signup_day"] == day, people["signup_s"], 0.0)[user]
    start_s = np.where(start_s < lo, lo + rs.random(n) * (86_400 - lo), start_s)
    other_device = _pick(rs.random(n), DEVICE_P_DRIFT if is_drift else DEVICE_P)
    session_device = np.where(rs.random(n) < 0.85, people["device"][user], other_device)

    n_views = 1 + rs.poisson(2.4, n)
    n_views = np.where(buys, np.maximum(n_views, 3), n_views)
    session = np.repeat(np.arange(n), n_views)
    last_view = np.cumsum(n_views) - 1
    page = _pick(rs.random(len(session)), PAGE_P)
    page[last_view[buys] - 1] = PAGES.index("cart")
    page[last_view[buys]] = PAGES.index("checkout")
    median_dwell = 28.0 * (1.5 if is_drift else 1.0)
    dwell = np.round(np.minimum(rs.lognormal(np.log(median_dwell), 1.0, len(session)), 3600.0), 3)
    # Each view starts when the previous one in its session ends.
    before = np.cumsum(dwell) - dwell
    offset_s = before - before[last_view - n_views + 1][session]
    view_ts = day_us + np.round((start_s[session] + offset_s) * 1e6).astype(np.int64)

    checkout = last_view[buys]
    t_user = user[buys]
    m = len(t_user)
    category = _pick(rt.random(m), CATEGORY_P_DRIFT if is_drift else CATEGORY_P)
    amount = np.exp(CATEGORY_MEDIAN[category] + CATEGORY_SIGMA[category] * rt.standard_normal(m))
    # Amounts stay in one scale across currencies so that spend features add up.
    amount = np.clip(np.round(amount * (1.6 if is_drift else 1.0), 2), 0.5, 50_000.0)
    country = np.where(rt.random(m) < 0.95, people["country"][t_user], _pick(rt.random(m), COUNTRY_P))
    currency = np.where(rt.random(m) < 0.93, COUNTRY_CURRENCY[country], CURRENCIES.index("USD"))
    pay_delay_s = dwell[checkout] * rt.uniform(0.3, 1.0, m)
    pay_ts = view_ts[checkout] + np.round(pay_delay_s * 1e6).astype(np.int64)
    clicks = {
        "user": user[session],
        "ts": view_ts,
        "session": first_session + session,
        "page": page,
        "device": session_device[session],
        "dwell_s": dwell,
    }
    txns = {
        "user": t_user,
        "ts": pay_ts,
        "amount": amount,
        "currency": currency,
        "country": country,
        "merchant_category": category,
        "is_refund": (rank[buys] == 0) & refunds[t_user],
    }
    return clicks, txns


def _churn_labels(signup_us, clicks, txns, start_us, days):
    """Weekly labels: did a user still around at t do nothing in (t, t + 30 days]?

    "Still around" is what the data can show: signed up by t and active (a sign-up, click
    or payment) in (t - 30 days, t]; a user silent for longer was labelled churned before.
    """
    users = len(signup_us)
    act_user = np.concatenate([clicks["user"], txns["user"], np.arange(users)])
    act_ts = np.concatenate([clicks["ts"], txns["ts"], signup_us])
    horizon = LABEL_HORIZON_DAYS * DAY_US
    parts = []
    for day in range(LABEL_EVERY_DAYS, days - LABEL_HORIZON_DAYS + 1, LABEL_EVERY_DAYS):
        t = start_us + day * DAY_US
        recent = np.bincount(act_user[(act_ts > t - horizon) & (act_ts <= t)], minlength=users)
        ahead = np.bincount(act_user[(act_ts > t) & (act_ts <= t + horizon)], minlength=users)
        user = np.flatnonzero((signup_us <= t) & (recent > 0))
        parts.append((user, np.full(len(user), t), ahead[user] == 0))
    if not parts:
        parts = [(np.zeros(0, np.int64),) * 3]
    user, ts, churned = (np.concatenate([p[i] for p in parts]) for i in range(3))
    return {"user": user, "ts": ts, "churned": churned.astype(bool), "label_ts": ts + horizon}


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _table(source, cols, strings, user_ids) -> pa.Table:
    """The source's table from integer-coded columns, sorted by time, with event ids."""
    order = np.argsort(cols["ts"], kind="stable")
    arrays = [
        _ids(ID_PREFIXES[source.name], len(order), 9),
        user_ids.take(cols["user"][order]),
        pa.array(cols["ts"][order], pa.timestamp("us", tz="UTC")),
    ]
    for column in source.columns:
        values = cols[column.name]
        values = values.take(order) if isinstance(values, pa.Array) else values[order]
        if column.name in strings:
            values = pa.array(strings[column.name]).take(values)
        arrays.append(pa.array(values, column.arrow_type))
    return pa.table(arrays, schema=source.arrow_schema())


def write_files(tables: dict[str, pa.Table], out_dir: str | Path, chunk_days: int = 30) -> list[Path]:
    """Write each table as files of ``chunk_days`` days of event_ts, in its source's format.

    Windows start at the earliest day any table has an event on, so all sources share
    boundaries; a window without events gets no file. Returns the paths written, sorted.
    """
    _check_int("chunk_days", chunk_days, 1, "use the number of days per file, e.g. chunk_days=30")
    unknown = sorted(set(tables) - set(FORMATS))
    if unknown:
        raise ValueError(f"tables {unknown} are not demo sources (use keys among {sorted(FORMATS)})")
    ts = {name: pc.cast(t["event_ts"], pa.int64()).to_numpy() for name, t in tables.items()}
    first_days = [v.min() // DAY_US for v in ts.values() if len(v)]
    origin_day = int(min(first_days)) if first_days else 0
    paths = []
    for name, table in tables.items():
        window = (ts[name] // DAY_US - origin_day) // chunk_days
        for w in np.unique(window):
            first_day = dt.date(1970, 1, 1) + dt.timedelta(days=origin_day + int(w) * chunk_days)
            path = Path(out_dir) / name / f"{name}-{first_day:%Y%m%d}.{FORMATS[name]}"
            path.parent.mkdir(parents=True, exist_ok=True)
            _write(table.filter(pa.array(window == w)), path)
            paths.append(path)
    return sorted(paths)


def _write(table: pa.Table, path: Path) -> None:
    if path.suffix == ".parquet":
        pq.write_table(table, path)
        return
    text = {f.name: _iso(table[f.name]) if pa.types.is_timestamp(f.type) else table[f.name] for f in table.schema}
    if path.suffix == ".csv":
        pacsv.write_csv(pa.table(text), path)
        return
    fields = []
    for i, (name, col) in enumerate(text.items()):
        if pa.types.is_string(col.type):
            # Escaping quote and backslash suffices: values are ids and enumerated labels.
            col = pc.replace_substring(pc.replace_substring(col, "\\", "\\\\"), '"', '\\"')
            col = pc.binary_join_element_wise('"', col, '"', "")
        value = pc.fill_null(pc.cast(col, pa.string()), "null")
        fields += ["{" if i == 0 else ",", json.dumps(name) + ":", value]
    lines = pc.binary_join_element_wise(*fields, "}\n", "")
    path.write_text("".join(lines.to_pylist()), encoding="utf-8")


def _iso(ts: pa.ChunkedArray) -> pa.ChunkedArray:
    return pc.binary_join_element_wise(pc.strftime(ts, format="%Y-%m-%dT%H:%M:%S"), "Z", "")


def _ids(prefix: str, n: int, width: int) -> pa.Array:
    digits = pc.utf8_lpad(pc.cast(pa.array(np.arange(n)), pa.string()), width, "0")
    return pc.binary_join_element_wise(prefix, digits, "")


def _rng(seed: int, stream: int, day: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, day])


def _pick(u: np.ndarray, p) -> np.ndarray:
    """Category index for each uniform draw, by the cumulative probabilities p."""
    return np.minimum(np.searchsorted(np.cumsum(p), u, side="right"), len(p) - 1)


def _time_of_day(rng: np.random.Generator, n: int) -> np.ndarray:
    """Seconds after midnight UTC, following the shop's daily rhythm."""
    return (_pick(rng.random(n), HOUR_P) + rng.random(n)) * 3600.0


def _check_int(name: str, value, minimum: int, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum} ({fix})")
