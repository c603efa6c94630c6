"""What serving accepts as a request-time feature value: the type and bounds its declaration implies."""

import datetime as dt
import math

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from keel.dsl import Column, EventSource, Feature, FeatureGroup
from keel.project import Project
from serving.inputs import BadInput, InputSpec, input_specs
from tests.factories.features import groups_for


@pytest.fixture
def project(payments) -> Project:
    moves = EventSource(
        name="moves",
        entity=payments.entity,
        columns=(Column("delta", "float64", min=-5, max=5), Column("city", "string")),
    )
    spend, ratio = groups_for(payments)
    basket = FeatureGroup(
        name="basket",
        entity=payments.entity,
        source=payments,
        features=(
            Feature("last_currency", "last", "currency"),
            Feature("items_min", "min", "items", window="7d"),
            Feature("amount_avg", "avg", "amount", window="7d"),
            Feature("amount_std", "stddev", "amount", window="7d"),
            Feature("currencies", "count_distinct", "currency", window="7d"),
            Feature("refunded", "last", "is_refund"),
            Feature("first_at", "first", "event_ts"),
        ),
    )
    movement = FeatureGroup(
        name="movement",
        entity=payments.entity,
        source=moves,
        features=(
            Feature("delta_sum", "sum", "delta", window="7d"),
            Feature("delta_last", "last", "delta"),
            Feature("last_city", "last", "city"),
        ),
    )
    return Project(
        name="t",
        sources=(payments, moves),
        start_date=dt.date(2026, 1, 1),
        feature_groups=(spend, ratio, basket, movement),
    )


def specs_of(project, refs_and_dtypes) -> dict[str, InputSpec]:
    refs, dtypes = zip(*refs_and_dtypes, strict=True)
    return {s.name: s for s in input_specs(project, refs, dtypes)}


def test_types_and_bounds_follow_from_the_source_declarations(project):
    specs = specs_of(
        project,
        [
            ("spend.n_7d", "int64"),
            ("spend.amount_7d", "double"),
            ("spend.last_amount", "double"),
            ("spend.avg_7d", "double"),
            ("spend_ratio.big_spender", "bool"),
            ("basket.last_currency", "string"),
            ("basket.items_min", "int64"),
            ("basket.amount_avg", "double"),
            ("basket.amount_std", "double"),
            ("basket.currencies", "int64"),
            ("basket.refunded", "bool"),
            ("basket.first_at", "timestamp[us, tz=UTC]"),
            ("movement.delta_sum", "double"),
            ("movement.delta_last", "double"),
            ("movement.last_city", "string"),
        ],
    )
    got = {name: (s.type, s.min, s.max, s.allowed) for name, s in specs.items()}
    assert got == {
        "n_7d": ("int64", 0, None, None),  # a count
        "amount_7d": ("float64", 0, None, None),  # a sum of amounts declared >= 0
        "last_amount": ("float64", 0, 10_000, None),  # the last amount: the column's own range
        "avg_7d": ("float64", None, None, None),  # derived by an expression: nothing to infer
        "big_spender": ("bool", None, None, None),
        "last_currency": ("string", None, None, ("EUR", "USD")),
        "items_min": ("int64", 1, 100, None),
        "amount_avg": ("float64", 0, 10_000, None),
        "amount_std": ("float64", 0, None, None),
        "currencies": ("int64", 0, None, None),
        "refunded": ("bool", None, None, None),
        "first_at": ("timestamp", None, None, None),
        "delta_sum": ("float64", None, None, None),  # a sum of values that may be negative: unbounded
        "delta_last": ("float64", -5, 5, None),
        "last_city": ("string", None, None, None),  # no declared values: any category
    }


def test_a_feature_the_project_does_not_declare_takes_its_type_from_the_baseline(project):
    specs = specs_of(
        project, [("age", "int64"), ("score", "float"), ("tier", "large_string"), ("spend.n_7d", "double")]
    )
    assert {n: (s.type, s.min, s.max) for n, s in specs.items()} == {
        "age": ("int64", None, None),
        "score": ("float64", None, None),
        "tier": ("string", None, None),
        # The model was trained on a float where the group now declares a count: the model's type, no bounds.
        "n_7d": ("float64", None, None),
    }


@pytest.fixture
def specs(project) -> dict[str, InputSpec]:
    return specs_of(
        project,
        [
            ("spend.n_7d", "int64"),
            ("spend.last_amount", "double"),
            ("spend.avg_7d", "double"),
            ("spend_ratio.big_spender", "bool"),
            ("basket.last_currency", "string"),
            ("basket.first_at", "timestamp[us, tz=UTC]"),
            ("movement.last_city", "string"),
        ],
    )


@pytest.mark.parametrize(
    ("feature", "value", "message"),
    [
        ("n_7d", math.inf, "features.n_7d: Infinity is not a finite number"),
        ("n_7d", -math.inf, "features.n_7d: -Infinity is not a finite number"),
        ("avg_7d", math.nan, "features.avg_7d: NaN is not a finite number"),
        ("avg_7d", "NaN", 'features.avg_7d: "NaN" is a string; avg_7d takes a number'),
        ("avg_7d", "Infinity", 'features.avg_7d: "Infinity" is a string'),
        ("avg_7d", "12", 'features.avg_7d: "12" is a string'),
        ("n_7d", True, "features.n_7d: true is a boolean; n_7d takes a number"),
        ("avg_7d", False, "features.avg_7d: false is a boolean"),
        ("avg_7d", 10**400, "features.avg_7d: 100000…(401 digits) is too large for a float64"),
        ("n_7d", 2**63, "features.n_7d: 9223372036854775808 is outside int64's range"),
        ("n_7d", 2.5, "features.n_7d: 2.5 is not a whole number; n_7d is int64"),
        ("n_7d", -1, "features.n_7d: -1 is below 0, the minimum of a count"),
        (
            "last_amount",
            -0.5,
            "features.last_amount: -0.5 is below 0, the minimum of column 'amount' of source 'payments'",
        ),
        ("last_amount", 10_000.5, "features.last_amount: 10000.5 is above 10000, the maximum of column 'amount'"),
        ("big_spender", 1, "features.big_spender: 1 is not a boolean; big_spender takes true or false"),
        ("big_spender", "true", 'features.big_spender: "true" is not a boolean'),
        (
            "last_currency",
            "GBP",
            "features.last_currency: \"GBP\" is not one of the values column 'currency' of source 'payments' allows (EUR, USD)",
        ),
        ("last_currency", 3, "features.last_currency: 3 is not a string"),
        ("last_city", 1.5, "features.last_city: 1.5 is not a string"),
        ("first_at", "yesterday", 'features.first_at: "yesterday" is not an ISO 8601 timestamp with a UTC offset'),
        ("first_at", "2026-03-01T12:00:00", "is not an ISO 8601 timestamp with a UTC offset"),
        ("first_at", True, "features.first_at: true is not an ISO 8601 timestamp"),
    ],
)
def test_a_value_that_does_not_fit_is_refused_naming_the_field_and_the_value(specs, feature, value, message):
    with pytest.raises(BadInput) as refused:
        specs[feature].check(value, f"features.{feature}")
    assert message in str(refused.value)


@pytest.mark.parametrize(
    ("feature", "value", "expected"),
    [
        ("n_7d", 3, 3),
        ("n_7d", 3.0, 3.0),  # a whole number written as a float is the same count
        ("n_7d", 0, 0),
        ("n_7d", None, None),  # missing: the model's default fills it
        ("last_amount", 0, 0),
        ("last_amount", 10_000, 10_000),
        ("last_amount", 12.25, 12.25),
        ("avg_7d", -1e300, -1e300),
        ("avg_7d", 2**62, 2**62),
        ("big_spender", False, False),
        ("last_currency", "USD", "USD"),
        ("last_city", "anywhere", "anywhere"),
        ("first_at", "2026-03-01T12:00:00Z", dt.datetime(2026, 3, 1, 12, tzinfo=dt.UTC)),
        ("first_at", "2026-03-01T13:00:00+01:00", dt.datetime(2026, 3, 1, 12, tzinfo=dt.UTC)),
    ],
)
def test_a_value_of_the_declared_type_within_bounds_is_taken(specs, feature, value, expected):
    assert specs[feature].check(value, f"features.{feature}") == expected
    assert specs[feature].check_column([value], f"inputs.{feature}") == [expected]


JSON_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**65), max_value=2**65),
    st.integers(min_value=-3, max_value=12_000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-3, max_value=12_000),
    st.sampled_from(["NaN", "Infinity", "EUR", "USD", "GBP", "2026-03-01T12:00:00Z", ""]),
    st.just(10**400),
)


@given(data=st.data())
@hsettings(
    max_examples=600, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_a_column_is_refused_exactly_when_one_of_its_values_is_and_for_the_first(specs, data):
    """``check_column`` (a vectorised fast path) against ``check`` value by value (the reference)."""
    name = data.draw(st.sampled_from(sorted(specs)))
    spec = specs[name]
    values = data.draw(st.lists(JSON_VALUES, max_size=12))
    expected, first_error = [], None
    for i, value in enumerate(values):
        try:
            expected.append(spec.check(value, f"inputs.{name}[{i}]"))
        except BadInput as exc:
            first_error = str(exc)
            break
    if first_error is None:
        assert spec.check_column(values, f"inputs.{name}") == expected
    else:
        with pytest.raises(BadInput) as refused:
            spec.check_column(values, f"inputs.{name}")
        assert str(refused.value) == first_error


def test_open_inference_datatypes_must_fit_the_feature(specs):
    assert specs["n_7d"].datatype == "INT64" and specs["avg_7d"].datatype == "FP64"
    assert specs["big_spender"].datatype == "BOOL" and specs["last_currency"].datatype == "BYTES"
    assert specs["first_at"].datatype == "BYTES"
    for spec, datatype in [(specs["n_7d"], "FP64"), (specs["avg_7d"], "INT32"), (specs["big_spender"], "BOOL")]:
        spec.check_datatype(datatype, f"inputs.{spec.name}")
    for spec, datatype, message in [
        (specs["n_7d"], "BYTES", "inputs.n_7d: datatype BYTES does not fit n_7d (int64; use INT64 or FP64)"),
        (specs["big_spender"], "FP64", "inputs.big_spender: datatype FP64 does not fit big_spender (bool; use BOOL)"),
        (specs["last_currency"], "INT64", "use BYTES"),
        (specs["avg_7d"], "FP99", "inputs.avg_7d: datatype FP99 is not an Open Inference Protocol datatype"),
    ]:
        with pytest.raises(BadInput) as refused:
            spec.check_datatype(datatype, f"inputs.{spec.name}")
        assert message in str(refused.value)


def test_a_column_declaring_non_finite_values_meaningful_lets_them_through(payments):
    if "allow_non_finite" not in Column.__dataclass_fields__:
        pytest.skip("keel.dsl.Column has no allow_non_finite here")
    ratios = EventSource(
        name="ratios", entity=payments.entity, columns=(Column("ratio", "float64", min=0, allow_non_finite=True),)
    )
    group = FeatureGroup(
        name="r",
        entity=payments.entity,
        source=ratios,
        features=(Feature("ratio_last", "last", "ratio"), Feature("n", "count")),
    )
    project = Project(name="t", sources=(ratios,), start_date=dt.date(2026, 1, 1), feature_groups=(group,))
    ratio_last, n = input_specs(project, ["r.ratio_last", "r.n"], ["double", "int64"])
    assert ratio_last.check(math.inf, "features.ratio_last") == math.inf
    assert ratio_last.check_column([1.0, math.inf, None], "inputs.ratio_last") == [1.0, math.inf, None]
    with pytest.raises(BadInput, match="-1 is below 0"):
        ratio_last.check(-1, "features.ratio_last")
    with pytest.raises(BadInput, match="Infinity is not a finite number"):
        n.check(math.inf, "features.n")
