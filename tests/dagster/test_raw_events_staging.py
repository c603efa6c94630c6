"""The raw event asset stages under KEEL_HOME/staging and leaves nothing there."""

import datetime as dt

from keel.ingest import batch as ingest
from tests.conftest import payment_rows
from tests.dagster.test_raw_events import START, defs, instance, project, run_ingest, write_csv  # noqa: F401


def test_an_ingest_run_stages_under_keel_home_and_removes_its_folder(
    defs,  # noqa: F811
    instance,  # noqa: F811
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

    result = run_ingest(defs, instance, [path], START, START + dt.timedelta(days=1))

    assert result.success
    assert roots == [settings.staging]
    assert list(settings.staging.iterdir()) == []
