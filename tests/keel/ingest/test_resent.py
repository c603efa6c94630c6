"""Event ids arriving again (keel.ingest.resent): one copy of every event id in a raw table, whatever its day."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections import Counter

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from keel.ingest.batch import QUARANTINE_TABLE, ingest_files
from keel.lakehouse.tables import Lakehouse
from tests.factories.ingest import write_csv
from tests.factories.payments import payment_rows

TABLE = "raw.payments"
DAY = dt.date(2026, 1, 5)
NOW = dt.datetime(2026, 2, 1, tzinfo=dt.UTC)


def ids_by_day(lake) -> dict[str, list[dt.date]]:
    out: dict[str, list[dt.date]] = {}
    for row in lake.read(TABLE, columns=["event_id", "event_ts"]).to_pylist():
        out.setdefault(row["event_id"], []).append(row["event_ts"].date())
    return out


def moved(row: dict, days: int, **changes) -> dict:
    return {**row, "event_ts": row["event_ts"] + dt.timedelta(days=days), **changes}


def test_an_event_resent_on_another_day_replaces_the_landed_copy_and_leaves_its_old_day(lake, payments, tmp_path):
    first = payment_rows(DAY, 10)
    assert ingest_files(lake, payments, [write_csv(tmp_path / "a.csv", first)], now=NOW).published
    # The same event three days later, with another amount: a correction.
    resent = moved(first[3], 3, amount=99.5)
    report = ingest_files(lake, payments, [write_csv(tmp_path / "b.csv", [resent])], run_id="fix", now=NOW)

    assert report.published, report.summary()
    assert (report.replaced, report.unchanged) == (1, 0)
    found = ids_by_day(lake)
    assert found[resent["event_id"]] == [DAY + dt.timedelta(days=3)]
    assert all(len(days) == 1 for days in found.values()) and len(found) == 10
    assert lake.partition_rows(TABLE)[DAY] == 9
    row = [r for r in lake.read(TABLE).to_pylist() if r["event_id"] == resent["event_id"]][0]
    assert row["amount"] == 99.5
    assert "of the valid rows: 0 new, 1 replaced" in report.summary()
    # The counts travel with the snapshots, and the old day was rewritten in the same publish.
    head = lake.snapshots(TABLE)[-1]
    assert head.properties["keel.rows.replaced"] == "1" and head.properties["keel.run_id"] == "fix"
    written = [s.summary.additional_properties for s in lake.table(TABLE).snapshots() if s.summary]
    assert {p["keel.partition"] for p in written if p.get("keel.run_id") == "fix"} == {
        str(DAY),
        str(DAY + dt.timedelta(days=3)),
    }


def test_with_on_duplicate_quarantine_a_changed_resend_is_refused_pointing_at_the_landed_copy(lake, payments, tmp_path):
    strict = dataclasses.replace(payments, on_duplicate="quarantine")
    first = payment_rows(DAY, 5)
    assert ingest_files(lake, strict, [write_csv(tmp_path / "a.csv", first)], now=NOW).published
    resent = [moved(first[0], 2), {**first[1], "amount": 1.25}, first[2]]  # moved, changed, unchanged
    fresh = payment_rows(DAY + dt.timedelta(days=2), 2, prefix="new")
    path = write_csv(tmp_path / "b.csv", [*resent, *fresh])

    report = ingest_files(lake, strict, [path], now=NOW)

    assert report.published, report.summary()
    assert report.quarantined == {"duplicate_event_id": 2} and report.unchanged == 1 and report.replaced == 0
    assert report.rows_read == 5 == report.rows_valid + 2
    found = ids_by_day(lake)
    assert found[first[0]["event_id"]] == [DAY] and len(found) == 7
    assert [r["amount"] for r in lake.read(TABLE).to_pylist() if r["event_id"] == first[1]["event_id"]] == [
        first[1]["amount"]
    ]
    bad = lake.read(QUARANTINE_TABLE).to_pylist()
    reasons = sorted(r["reason"] for r in bad)
    assert reasons == [
        f"event_id \"{first[i]['event_id']}\" already landed on {DAY} with other values (on_duplicate='quarantine'; "
        "declare on_duplicate='replace' to take re-sent events as corrections)"
        for i in (0, 1)
    ]
    assert sorted(r["row_number"] for r in bad) == [1, 2]


def test_ingesting_a_file_again_changes_nothing_and_counts_every_row_unchanged(lake, payments, tmp_path):
    path = write_csv(tmp_path / "a.csv", payment_rows(DAY, 8) + payment_rows(DAY + dt.timedelta(days=1), 4))
    assert ingest_files(lake, payments, [path], now=NOW).published
    before = sorted(lake.read(TABLE).to_pylist(), key=lambda r: r["event_id"])

    again = ingest_files(lake, payments, [path], now=NOW)

    assert again.published and (again.unchanged, again.replaced) == (12, 0)
    assert sorted(lake.read(TABLE).to_pylist(), key=lambda r: r["event_id"]) == before


def test_an_earlier_copy_is_looked_for_only_within_duplicates_within_when_declared(lake, payments, tmp_path):
    bounded = dataclasses.replace(payments, duplicates_within="7d")
    first = payment_rows(DAY, 3)
    assert ingest_files(lake, bounded, [write_csv(tmp_path / "a.csv", first)], now=NOW).published
    near, far = moved(first[0], 5), moved(first[1], 20)

    found_near = ingest_files(lake, bounded, [write_csv(tmp_path / "b.csv", [near])], now=NOW)
    found_far = ingest_files(lake, bounded, [write_csv(tmp_path / "c.csv", [far])], now=NOW)

    # The near one is found and corrected; the far one's copy lies beyond the declared bound of
    # the file's days, so it is not looked for, and lands beside it (the price of the bound).
    assert (found_near.replaced, found_far.replaced) == (1, 0)
    found = ids_by_day(lake)
    assert found[near["event_id"]] == [DAY + dt.timedelta(days=5)]
    assert sorted(found[far["event_id"]]) == [DAY, DAY + dt.timedelta(days=20)]


def test_a_bad_on_duplicate_or_bound_is_refused_at_declaration(payments):
    from keel.dsl import DeclarationError

    with pytest.raises(DeclarationError, match=r"on_duplicate 'keep' is not known \(use one of replace, quarantine\)"):
        dataclasses.replace(payments, on_duplicate="keep")
    with pytest.raises(DeclarationError, match=r"duplicates_within 'a while' is not a duration"):
        dataclasses.replace(payments, duplicates_within="a while")


# Against a brute-force model: any sequence of files, both rules ------------------------------

EVENT_IDS = [f"e{i}" for i in range(6)]


@st.composite
def batches(draw):
    """Files of events drawn from a few ids, days and amounts: re-sends, corrections, moves."""
    files = []
    for _ in range(draw(st.integers(1, 4))):
        rows = {}
        for event_id in draw(st.lists(st.sampled_from(EVENT_IDS), min_size=1, max_size=5, unique=True)):
            day = DAY + dt.timedelta(days=draw(st.integers(0, 3)))
            amount = float(draw(st.sampled_from([1.0, 2.0])))
            rows[event_id] = {
                "event_id": event_id,
                "user_id": "u1",
                "event_ts": dt.datetime.combine(day, dt.time(12), dt.UTC),
                "amount": amount,
                "currency": "EUR",
                "items": 1,
                "is_refund": False,
            }
        files.append(list(rows.values()))
    return files


# Every example lands files in a fresh lakehouse (about a second); shrinking a failure would take
# minutes, so the failing sequence is reported as found.
@settings(
    max_examples=10,
    deadline=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(files=batches(), rule=st.sampled_from(["replace", "quarantine"]))
def test_any_sequence_of_files_leaves_one_copy_per_id_as_the_rule_says(tmp_path_factory, payments, files, rule):
    from keel.config import Settings

    home = tmp_path_factory.mktemp("keel")
    lake = Lakehouse.from_settings(Settings.from_env({"KEEL_HOME": str(home)}))
    source = dataclasses.replace(payments, on_duplicate=rule)
    expected: dict[str, dict] = {}
    for n, rows in enumerate(files):
        report = ingest_files(lake, source, [write_csv(home / f"f{n}.csv", rows)], now=NOW)
        counts = Counter()
        for row in rows:
            known = expected.get(row["event_id"])
            if known is None:
                expected[row["event_id"]] = row
                counts["new"] += 1
            elif known == row:
                counts["unchanged"] += 1
            elif rule == "replace":
                expected[row["event_id"]] = row
                counts["replaced"] += 1
            else:
                counts["duplicate"] += 1
        # A file whose every event is a refused duplicate has nothing to land, and says so.
        assert report.published == (counts["duplicate"] < len(rows)), report.summary()
        assert (report.replaced, report.unchanged) == (counts["replaced"], counts["unchanged"])
        assert report.quarantined == ({"duplicate_event_id": counts["duplicate"]} if counts["duplicate"] else {})
        assert report.rows_read == report.rows_valid + counts["duplicate"]
    landed = {r["event_id"]: r for r in lake.read(TABLE).to_pylist()}
    assert lake.read(TABLE).num_rows == len(landed) == len(expected)
    assert {k: (v["event_ts"], v["amount"]) for k, v in landed.items()} == {
        k: (v["event_ts"], v["amount"]) for k, v in expected.items()
    }
