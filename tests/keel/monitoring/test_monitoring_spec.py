"""Monitoring declarations: thresholds, the MonitorSpec's defaults and validation, durations, loading, window rows."""

import datetime as dt
import sys
import textwrap

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from keel.lakehouse.tables import PROP_PARTITION, PROP_RUN_ID, PROP_SOURCE
from keel.models.spec import load_models
from keel.monitoring.declarations import (
    STATISTICS,
    WINDOW_FIELDS,
    MonitorError,
    MonitorSpec,
    Threshold,
    duration,
    load_monitors,
    monitors_for,
    replace_window,
)

DAY = dt.timedelta(days=1)
HOUR = dt.timedelta(hours=1)
START = dt.datetime(2026, 5, 1, tzinfo=dt.UTC)
DURATION_HINT = "is not a duration (use e.g. '7d', '36h', or '0d' for none)"


# Thresholds ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "level"),
    [(0.0, "ok"), (0.0999, "ok"), (0.1, "warn"), (0.15, "warn"), (0.2, "drift"), (7.5, "drift")],
)
def test_a_statistic_warns_at_warn_and_drifts_at_its_threshold(value, level):
    assert Threshold("psi", 0.2, warn=0.1).level(value) == level


@pytest.mark.parametrize(
    ("value", "level"),
    [(1.0, "ok"), (0.0501, "ok"), (0.05, "warn"), (0.02, "warn"), (0.01, "drift"), (0.0, "drift")],
)
def test_a_p_value_is_judged_the_other_way(value, level):
    assert Threshold("ks_pvalue", 0.01, warn=0.05).level(value) == level
    assert Threshold("chi2_pvalue", 0.01, warn=0.05).level(value) == level


def test_directions_and_kinds_of_the_statistics():
    assert {name: (Threshold(name, 0.5).kind, Threshold(name, 0.5).larger_is_worse) for name in STATISTICS} == {
        "psi": ("numeric", True),
        "ks": ("numeric", True),
        "ks_pvalue": ("numeric", False),
        "wasserstein_norm": ("numeric", True),
        "js": ("categorical", True),
        "chi2_pvalue": ("categorical", False),
    }


def test_without_warn_there_is_no_warning_and_a_missing_value_is_unknown():
    bare = Threshold("ks", 0.3)
    assert [bare.level(v) for v in (0.29, 0.3, 1.0)] == ["ok", "drift", "drift"]
    assert bare.level(None) == "unknown" and bare.level(float("nan")) == "unknown"
    same = Threshold("js", 0.1, warn=0.1)  # warn equal to the threshold: drift wins
    assert [same.level(v) for v in (0.09, 0.1)] == ["ok", "drift"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("kl", 0.1),
            "threshold: statistic 'kl' is not known (use one of psi, ks, ks_pvalue, wasserstein_norm, js, chi2_pvalue)",
        ),
        (("psi", -0.1), "threshold psi: threshold=-0.1 must be a number >= 0"),
        (("psi", float("nan")), "threshold psi: threshold=nan must be a number >= 0"),
        (("psi", "0.2"), "threshold psi: threshold='0.2' must be a number >= 0"),
        (("psi", True), "threshold psi: threshold=True must be a number >= 0"),
        (("psi", None), "threshold psi: threshold=None must be a number >= 0"),
        (("psi", 0.2, -0.1), "threshold psi: warn=-0.1 must be a number >= 0"),
        (
            ("psi", 0.2, 0.3),
            "threshold psi: warn=0.3 must come before threshold=0.2 (smaller), so a warning precedes drift",
        ),
        (
            ("ks_pvalue", 0.05, 0.01),
            "threshold ks_pvalue: warn=0.01 must come before threshold=0.05 (larger), so a warning precedes drift",
        ),
    ],
)
def test_a_bad_threshold_names_the_statistic_the_value_and_the_rule(args, message):
    with pytest.raises(MonitorError) as caught:
        Threshold(*args)
    assert str(caught.value) == message
    assert isinstance(caught.value, ValueError)


# MonitorSpec: defaults ----------------------------------------------------------------------------


def test_every_setting_has_the_documented_default(churn, spend):
    m = MonitorSpec(churn)
    assert m.name == "churn" and m.partitions == "daily"
    assert m.numeric == Threshold("psi", 0.2, warn=0.1)  # PSI for numbers
    assert m.categorical == Threshold("js", 0.1, warn=0.05)  # Jensen-Shannon distance for categories
    assert m.prediction == Threshold("psi", 0.2, warn=0.1)
    assert dict(m.features) == {} and m.label is None
    assert (m.drift_share, m.weighted, m.min_rows, m.sample_rows, m.seed) == (0.5, False, 100, 100_000, 0)
    assert (m.tolerance, m.min_labels) == (0.05, 50)
    assert (m.label_window_delta, m.label_delay_delta) == (dt.timedelta(days=7), dt.timedelta(0))
    # The label's default follows the task: a class label is categorical, a regression label numeric.
    assert m.label_threshold() == Threshold("js", 0.1, warn=0.05)
    assert MonitorSpec(spend).label_threshold() == Threshold("psi", 0.2, warn=0.1)
    own = Threshold("chi2_pvalue", 0.001)
    assert MonitorSpec(churn, label=own).label_threshold() is own


def test_a_feature_uses_its_own_threshold_else_the_default_for_its_kind(churn):
    own = Threshold("ks_pvalue", 0.001)
    m = MonitorSpec(churn, features={"amount": own}, numeric=Threshold("ks", 0.3))
    assert m.threshold_for("amount", "numeric") is own
    assert m.threshold_for("items", "numeric") == Threshold("ks", 0.3)
    assert m.threshold_for("currency", "categorical") == Threshold("js", 0.1, warn=0.05)


def test_a_feature_threshold_of_the_other_kind_names_the_feature_and_the_statistic(churn):
    m = MonitorSpec(churn, features={"currency": Threshold("psi", 0.2)})
    with pytest.raises(MonitorError) as caught:
        m.threshold_for("currency", "categorical")
    assert str(caught.value) == (
        "monitor of model 'churn': feature 'currency' is categorical, but its threshold uses 'psi', a numeric statistic"
    )


# MonitorSpec: validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"partitions": "weekly"}, "partitions 'weekly' is not known (use 'daily' or 'hourly')"),
        (
            {"numeric": Threshold("js", 0.1)},
            "numeric=Threshold(statistic='js', threshold=0.1, warn=None) must be a Threshold on a numeric "
            "statistic (psi, ks, ks_pvalue, wasserstein_norm)",
        ),
        (
            {"numeric": 0.2},
            "numeric=0.2 must be a Threshold on a numeric statistic (psi, ks, ks_pvalue, wasserstein_norm)",
        ),
        (
            {"categorical": Threshold("psi", 0.2)},
            "categorical=Threshold(statistic='psi', threshold=0.2, warn=None) must be a Threshold on a categorical "
            "statistic (js, chi2_pvalue)",
        ),
        ({"features": {"amount": 0.3}}, "features['amount']=0.3 is not a Threshold"),
        (
            {"prediction": Threshold("chi2_pvalue", 0.01)},
            "prediction=Threshold(statistic='chi2_pvalue', threshold=0.01, warn=None) must be a Threshold on a "
            "numeric statistic",
        ),
        ({"drift_share": 0}, "drift_share=0 must be in (0, 1], e.g. 0.5"),
        ({"drift_share": 1.5}, "drift_share=1.5 must be in (0, 1], e.g. 0.5"),
        ({"drift_share": float("nan")}, "drift_share=nan must be in (0, 1], e.g. 0.5"),
        ({"min_rows": 0}, "min_rows=0 must be a positive integer"),
        ({"min_rows": 10.0}, "min_rows=10.0 must be a positive integer"),
        ({"sample_rows": -5}, "sample_rows=-5 must be a positive integer"),
        ({"min_labels": True}, "min_labels=True must be a positive integer"),
        ({"tolerance": -0.01}, "tolerance=-0.01 must be a number >= 0, e.g. 0.05"),
        ({"tolerance": float("nan")}, "tolerance=nan must be a number >= 0, e.g. 0.05"),
        ({"tolerance": "5%"}, "tolerance='5%' must be a number >= 0, e.g. 0.05"),
        ({"tolerance": False}, "tolerance=False must be a number >= 0, e.g. 0.05"),
        ({"label_window": "3x"}, f"label_window '3x' {DURATION_HINT}"),
        ({"label_window": 7}, f"label_window 7 {DURATION_HINT}"),
        ({"label_window": "lifetime"}, f"label_window 'lifetime' {DURATION_HINT}"),
        ({"label_delay": "30 days"}, f"label_delay '30 days' {DURATION_HINT}"),
        ({"label_delay": "-1d"}, f"label_delay '-1d' {DURATION_HINT}"),
    ],
)
def test_a_bad_setting_names_the_model_the_field_the_value_and_the_fix(churn, fields, message):
    with pytest.raises(MonitorError) as caught:
        MonitorSpec(churn, **fields)
    assert str(caught.value) == f"monitor of model 'churn': {message}"


def test_the_model_must_be_a_declared_model_spec():
    with pytest.raises(MonitorError) as caught:
        MonitorSpec("churn")
    assert str(caught.value) == "monitor of model 'churn': model 'churn' is not a keel.models.spec.ModelSpec"


def test_hourly_partitions_and_a_zero_label_delay_are_accepted(churn):
    m = MonitorSpec(churn, partitions="hourly", label_delay="0h", label_window="36h", tolerance=0, drift_share=1)
    assert (m.partitions, m.label_delay_delta, m.label_window_delta) == ("hourly", dt.timedelta(0), 36 * HOUR)


# Durations ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7d", dt.timedelta(days=7)),
        ("30d", dt.timedelta(days=30)),
        ("36h", dt.timedelta(hours=36)),
        ("90m", dt.timedelta(minutes=90)),
        ("45s", dt.timedelta(seconds=45)),
        ("2w", dt.timedelta(days=14)),
        ("0d", dt.timedelta(0)),
        ("0h", dt.timedelta(0)),
        ("0m", dt.timedelta(0)),
        ("0", dt.timedelta(0)),
    ],
)
def test_a_duration_parses_to_its_exact_timedelta(text, expected):
    assert duration(text, "label_delay") == expected


@pytest.mark.parametrize("text", ["3x", "", "7", "-1d", "1.5d", "7 d", "d", "lifetime", None, 7, 7.0])
def test_anything_else_is_not_a_duration(text):
    with pytest.raises(MonitorError) as caught:
        duration(text, "monitor of model 'churn': label_window")
    assert str(caught.value) == f"monitor of model 'churn': label_window {text!r} {DURATION_HINT}"


# Which monitors a project has ---------------------------------------------------------------------


def test_declared_monitors_are_kept_and_other_models_get_the_defaults(churn, spend):
    declared = MonitorSpec(spend, tolerance=0.1)
    monitors = monitors_for((churn, spend), (declared,))
    assert [m.name for m in monitors] == ["churn", "spend"]
    assert monitors[0] == MonitorSpec(churn) and monitors[1] is declared


def test_a_monitor_of_an_undeclared_model_is_an_error(churn, spend):
    with pytest.raises(MonitorError) as caught:
        monitors_for([churn], [MonitorSpec(spend)])
    assert str(caught.value) == "monitors declared for unknown model(s) ['spend'] (declared models: ['churn'])"


def test_the_projects_pipelines_monitor_churn_with_its_label_delay_and_window():
    from pipelines import monitoring

    models = load_models("pipelines")
    monitors = load_monitors("pipelines", models)

    assert [m.name for m in monitors] == sorted(models) == ["churn"]
    (churn,) = monitors
    assert churn is monitoring.churn_monitor and churn.model is models["churn"]
    assert churn.label_delay_delta == dt.timedelta(days=30)
    assert churn.label_window_delta == dt.timedelta(days=7)
    assert (churn.min_rows, churn.tolerance, churn.min_labels, churn.partitions) == (100, 0.05, 50, "daily")
    assert churn.drift_share == 0.3


@pytest.fixture
def project_module(tmp_path, monkeypatch):
    """Writes a throwaway project package (optionally with a monitoring module) importable by its name."""
    monkeypatch.syspath_prepend(str(tmp_path))
    names = []

    def make(name: str, monitoring: str | None = None) -> str:
        package = tmp_path / name
        package.mkdir()
        (package / "__init__.py").write_text("")
        if monitoring is not None:
            (package / "monitoring.py").write_text(textwrap.dedent(monitoring))
        names.append(name)
        return name

    yield make
    for module in [m for m in sys.modules if m.split(".")[0] in names]:
        del sys.modules[module]


def test_a_project_without_a_monitoring_module_gets_the_defaults(project_module, churn, spend):
    name = project_module("keel_test_unmonitored")
    assert load_monitors(name, {"churn": churn, "spend": spend}) == [MonitorSpec(churn), MonitorSpec(spend)]


def test_a_monitoring_module_that_fails_to_import_is_not_mistaken_for_a_missing_one(project_module, churn):
    name = project_module("keel_test_broken", "import keel_test_no_such_module\n")
    with pytest.raises(ModuleNotFoundError, match="keel_test_no_such_module"):
        load_monitors(name, {"churn": churn})


def test_monitors_that_are_not_monitor_specs_are_an_error(project_module, churn):
    name = project_module("keel_test_stray", "MONITORS = ('churn',)\n")
    with pytest.raises(MonitorError) as caught:
        load_monitors(name, {"churn": churn})
    assert str(caught.value) == (
        "module 'keel_test_stray.monitoring': MONITORS must be a tuple of keel.monitoring.declarations.MonitorSpec"
    )


# Rows of a window ---------------------------------------------------------------------------------

RESULTS = "monitoring.results"
SCHEMA = pa.schema([*WINDOW_FIELDS, pa.field("value", pa.float64())])


def hourly_rows(model: str, start: dt.datetime, hours: int, value: float) -> pa.Table:
    starts = [start + i * HOUR for i in range(hours)]
    return pa.Table.from_pylist(
        [{"window_start": s, "window_end": s + HOUR, "model": model, "version": 1, "value": value} for s in starts],
        schema=SCHEMA,
    )


def test_a_window_rerun_replaces_that_models_rows_of_the_window_only(lake):
    for model in ("churn", "fraud"):
        replace_window(lake, RESULTS, SCHEMA, model, START, START + 3 * DAY, hourly_rows(model, START, 72, 1.0), "r1")

    start, end = START + 10 * HOUR, START + 12 * HOUR
    head, again = (
        replace_window(lake, RESULTS, SCHEMA, "churn", start, end, hourly_rows("churn", start, 1, 9.0), run)
        for run in ("r2", "r3")
    )

    assert head != again and again == lake.head(RESULTS)
    stored = lake.read(RESULTS)
    churn = stored.filter(pc.equal(stored.column("model"), "churn"))
    fraud = stored.filter(pc.equal(stored.column("model"), "fraud"))
    assert fraud.num_rows == 72 and set(fraud.column("value").to_pylist()) == {1.0}
    by_hour = dict(zip(churn.column("window_start").to_pylist(), churn.column("value").to_pylist(), strict=True))
    assert len(by_hour) == churn.num_rows == 71  # 10:00 replaced, 11:00 gone: the rerun had no row for it
    assert by_hour[START + 10 * HOUR] == 9.0 and START + 11 * HOUR not in by_hour
    assert all(v == 1.0 for t, v in by_hour.items() if t != START + 10 * HOUR)


def test_a_window_write_is_stamped_with_its_run_source_and_every_day_it_covers(lake):
    replace_window(lake, RESULTS, SCHEMA, "churn", START, START + 3 * DAY, hourly_rows("churn", START, 72, 1.0), "r1")
    range_write = lake.snapshots(RESULTS)[-1].properties
    replace_window(
        lake, RESULTS, SCHEMA, "churn", START + DAY, START + DAY + HOUR, hourly_rows("churn", START + DAY, 1, 2.0), "r2"
    )
    hour_write = lake.snapshots(RESULTS)[-1].properties

    assert (range_write[PROP_RUN_ID], range_write[PROP_SOURCE]) == ("r1", "results:churn")
    assert range_write[PROP_PARTITION] == "2026-05-01..2026-05-03"
    assert (hour_write[PROP_RUN_ID], hour_write[PROP_PARTITION]) == ("r2", "2026-05-02")
