"""What a served model accepts as a feature value given at request time.

Each feature's type and bounds come from its declaration where the project has one: a
feature of a group with a source aggregates a declared column, so its type is the
aggregation's and its range follows from the column's where the aggregation keeps values
inside it (``first``/``last``/``min``/``max``/``avg`` of a column declared with min/max or
allowed values); a count or a standard deviation is never negative, and nor is a sum of a
column declared non-negative (nor positive, of one declared non-positive). A derived
feature has its declared type and no inferred range. A feature the project does not
declare, or whose declaration no longer has the type the model was trained on, takes the
type of the model's baseline and no bounds.

Values arrive parsed from JSON: a number must be a finite int or float (a bool is not a
number here, nor is the string "NaN"; 1e309 parses as infinity and is refused, unless the
source column declares ``allow_non_finite``), whole for an integer feature; a category is a string, one of the declared values when the source
declares them; a bool is true or false; a timestamp an ISO 8601 string with a UTC offset.
Null means missing: the model's default fills it.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from keel.dsl import Derived, Feature

if TYPE_CHECKING:
    from keel.dsl import FeatureGroup
    from keel.project import Project

INT64, FLOAT64, BOOL, STRING, TIMESTAMP, DATE = "int64", "float64", "bool", "string", "timestamp", "date"
NUMERIC = (INT64, FLOAT64)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
EXACT = 2**53  # floats hold every integer below this exactly

OIP_NUMERIC = ("INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64", "FP16", "FP32", "FP64")
OIP_DATATYPES = ("BOOL", *OIP_NUMERIC, "BYTES")
_OIP = {INT64: "INT64", FLOAT64: "FP64", BOOL: "BOOL", STRING: "BYTES", TIMESTAMP: "BYTES", DATE: "BYTES"}
_OIP_FITTING = {INT64: OIP_NUMERIC, FLOAT64: OIP_NUMERIC, BOOL: ("BOOL",)}


class BadInput(ValueError):
    """A request the model cannot take; the message names the field, the value and the fix."""


@dataclass(frozen=True)
class InputSpec:
    """One feature as a request may give it: its type, and the range its declaration implies."""

    name: str
    type: str
    min: float | None = None
    max: float | None = None
    allowed: tuple[str, ...] | None = None
    origin: str = ""  # what the bounds come from: "column 'amount' of source 'payments'", "a count"
    finite: bool = True  # False where the source column declares that NaN and infinities mean something

    @property
    def datatype(self) -> str:
        """The Open Inference Protocol datatype a client should send."""
        return _OIP.get(self.type, "FP64")

    def check_datatype(self, datatype: str, where: str) -> None:
        if datatype not in OIP_DATATYPES:
            raise BadInput(
                f"{where}: datatype {datatype} is not an Open Inference Protocol datatype "
                f"(use {self.datatype} for {self.name})"
            )
        fitting = _OIP_FITTING.get(self.type, ("BYTES",))
        if datatype not in fitting:
            other = " or FP64" if self.type == INT64 else ""
            raise BadInput(
                f"{where}: datatype {datatype} does not fit {self.name} ({self.type}; use {self.datatype}{other})"
            )

    def check(self, value: Any, where: str) -> Any:
        """``value`` as the model takes it, or BadInput naming ``where`` and the value."""
        if value is None:
            return None
        if self.type in NUMERIC:
            return self._number(value, where)
        if self.type == BOOL:
            if type(value) is not bool:
                raise BadInput(f"{where}: {_show(value)} is not a boolean; {self.name} takes true or false, {_NULL}")
            return value
        if self.type == STRING:
            if type(value) is not str:
                raise BadInput(f"{where}: {_show(value)} is not a string; {self.name} takes a category as a string")
            if self.allowed is not None and value not in self.allowed:
                raise BadInput(
                    f"{where}: {_show(value)} is not one of the values {self.origin} allows ({', '.join(self.allowed)})"
                )
            return value
        if self.type == TIMESTAMP:
            return _timestamp(value, where)
        if self.type == DATE:
            return _date(value, where)
        return value

    def check_column(self, values: list[Any], where: str) -> list[Any]:
        """``check`` of each value (``where[i]`` naming the first that does not fit), vectorised
        for the common case where all fit."""
        if self._all_fit(values):
            return values
        return [self.check(value, f"{where}[{i}]") for i, value in enumerate(values)]

    def _all_fit(self, values: list[Any]) -> bool:
        """True only when every value fits as it is (False means: look value by value)."""
        types = set(map(type, values))
        if self.type in NUMERIC:
            if not types <= _NUMBER_TYPES:
                return False
            try:
                array = np.array(values, dtype=np.float64)  # None -> NaN
            except OverflowError:  # an int past float64's range
                return False
            finite = np.isfinite(array)
            if self.finite and int(np.count_nonzero(~finite)) != values.count(None):
                return False  # a NaN or an infinity that was not a None
            numbers = array[finite]
            if numbers.size == 0:
                return True
            low, high = numbers.min(), numbers.max()
            if self.type == INT64 and (low <= -EXACT or high >= EXACT or not np.all(numbers == np.floor(numbers))):
                return False
            if self.type == FLOAT64 and int in types and (low <= -EXACT or high >= EXACT):
                return False  # a large int: check it exactly
            return (self.min is None or low >= self.min) and (self.max is None or high <= self.max)
        if self.type == BOOL:
            return types <= {bool, type(None)}
        if self.type == STRING:
            if not types <= {str, type(None)}:
                return False
            return self.allowed is None or set(values) - {None} <= set(self.allowed)
        return False

    def _number(self, value: Any, where: str) -> Any:
        kind = type(value)
        if kind is bool:
            raise BadInput(f"{where}: {_show(value)} is a boolean; {self.name} takes a number ({self.type}), {_NULL}")
        if kind is str:
            raise BadInput(f"{where}: {_show(value)} is a string; {self.name} takes a number ({self.type}), {_NULL}")
        if kind is int:
            if self.type == INT64 and not INT64_MIN <= value <= INT64_MAX:
                raise BadInput(f"{where}: {_show(value)} is outside int64's range")
            try:
                number = float(value)
            except OverflowError:
                raise BadInput(f"{where}: {_show(value)} is too large for a float64") from None
        elif kind is float:
            if not math.isfinite(value):
                if not self.finite:
                    return value
                raise BadInput(
                    f"{where}: {_show(value)} is not a finite number (numbers past ±1.8e308, such as 1e309, "
                    f"read as Infinity); send a finite number, {_NULL}"
                )
            if self.type == INT64 and not value.is_integer():
                raise BadInput(f"{where}: {_show(value)} is not a whole number; {self.name} is int64")
            if self.type == INT64 and not INT64_MIN <= value < 2**63:
                raise BadInput(f"{where}: {_show(value)} is outside int64's range")
            number = value
        else:
            raise BadInput(f"{where}: {_show(value)} is not a number; {self.name} takes a number ({self.type})")
        if self.min is not None and (value if kind is int else number) < self.min:
            raise BadInput(f"{where}: {_show(value)} is below {_bound(self.min)}, the minimum of {self.origin}")
        if self.max is not None and (value if kind is int else number) > self.max:
            raise BadInput(f"{where}: {_show(value)} is above {_bound(self.max)}, the maximum of {self.origin}")
        return value


_NULL = "or null for its default"
_NUMBER_TYPES = {int, float, type(None)}


def input_specs(project: Project, refs: Sequence[str], dtypes: Sequence[str]) -> tuple[InputSpec, ...]:
    """One spec per feature: ``refs`` as resolved (``group.feature``, or a bare name), ``dtypes``
    the Arrow types the model was trained on (its baseline's)."""
    groups = {g.name: g for g in project.feature_groups}
    out = []
    for ref, dtype in zip(refs, dtypes, strict=True):
        group_name, _, name = ref.rpartition(".")
        trained = _type_of(dtype)
        spec = _declared(groups[group_name], name) if group_name in groups else None
        if spec is None or spec.type != trained:
            spec = InputSpec(name, trained)
        out.append(spec)
    return tuple(out)


def _declared(group: FeatureGroup, name: str) -> InputSpec | None:
    try:
        feature = group.feature(name)
    except ValueError:
        return None
    typ = group.feature_type(feature)
    if isinstance(feature, Derived) or not isinstance(feature, Feature):
        return InputSpec(name, typ)
    if feature.agg in ("count", "count_distinct"):
        return InputSpec(name, typ, min=0, origin="a count")
    column = group.source.column(feature.column)
    origin = f"column '{column.name}' of source '{group.source.name}'"
    finite = not getattr(column, "allow_non_finite", False)
    if feature.agg == "stddev":
        return InputSpec(name, typ, min=0, origin="a standard deviation", finite=finite)
    if feature.agg in ("first", "last", "min", "max", "avg"):
        allowed = tuple(column.allowed) if column.allowed is not None else None
        return InputSpec(name, typ, column.min, column.max, allowed, origin, finite)
    if feature.agg == "sum":
        low = 0 if column.min is not None and column.min >= 0 else None
        high = 0 if column.max is not None and column.max <= 0 else None
        return InputSpec(name, typ, low, high, origin=f"a sum of {origin}", finite=finite)
    return InputSpec(name, typ, finite=finite)


def _type_of(dtype: str) -> str:
    """A baseline's Arrow type name as a declaration's column type."""
    if dtype in ("string", "large_string", "utf8", "large_utf8"):
        return STRING
    if dtype == "bool":
        return BOOL
    if dtype.startswith("timestamp"):
        return TIMESTAMP
    if dtype.startswith("date"):
        return DATE
    if dtype.startswith(("int", "uint")):
        return INT64
    return FLOAT64


def _timestamp(value: Any, where: str) -> dt.datetime:
    parsed = None
    if type(value) is str:
        try:
            parsed = dt.datetime.fromisoformat(value)
        except ValueError:
            parsed = None
    if parsed is None or parsed.tzinfo is None:
        raise BadInput(
            f'{where}: {_show(value)} is not an ISO 8601 timestamp with a UTC offset (e.g. "2026-03-01T12:00:00Z")'
        )
    return parsed.astimezone(dt.UTC)


def _date(value: Any, where: str) -> dt.date:
    try:
        if type(value) is str:
            return dt.date.fromisoformat(value)
    except ValueError:
        pass
    raise BadInput(f'{where}: {_show(value)} is not an ISO 8601 date (e.g. "2026-03-01")')


def _show(value: Any) -> str:
    """A value as the client wrote it in JSON (Infinity and NaN as JavaScript writes them)."""
    if type(value) is int:
        text = str(value)
        return text if len(text) <= 24 else f"{text[:6]}…({len(text)} digits)"
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


def _bound(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)
