"""The raw event asset stages under KEEL_HOME/staging and leaves nothing there."""

import datetime as dt

from keel.ingest import batch as ingest
from tests.factories.dagster_runs import START, run_ingest, write_csv
from tests.factories.payments import payment_rows


def test_an_ingest_run_stages_under_keel_home_and_removes_its_folder(
    ingest_defs,
    instance,
    keel_home,
    settings,
    monkeypatch,
):
    roots = []
    real_prepare = ingest.prepare

    def spy(*args, **kwargs):
        roots.append(kwargs["staging_root"])
        return real_prepare(*args, **kwargs)

    monkeypatch.setattr(ingest, "prepare", spy)
    path = write_csv(keel_home / "landing" / "payments" / "batch.csv", payment_rows(START, 20))

    result = run_ingest(ingest_defs, instance, [path], START, START + dt.timedelta(days=1))

    assert result.success
    assert roots == [settings.staging]
    assert list(settings.staging.iterdir()) == []
