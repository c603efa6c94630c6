"""What every declaration is made of: column types, valid names, durations and ``DeclarationError``."""

from __future__ import annotations

import re

import pyarrow as pa

COLUMN_TYPES: dict[str, pa.DataType] = {
    "string": pa.string(),
    "int64": pa.int64(),
    "float64": pa.float64(),
    "bool": pa.bool_(),
    "timestamp": pa.timestamp("us", tz="UTC"),
    "date": pa.date32(),
}

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class DeclarationError(ValueError):
    """A declaration in the project module is invalid."""


def check_name(kind: str, name: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise DeclarationError(
            f"{kind} name {name!r} is not a valid identifier "
            "(use lower_snake_case starting with a letter, e.g. 'user_txn')"
        )


DUCKDB_TYPES = {
    "string": "VARCHAR",
    "int64": "BIGINT",
    "float64": "DOUBLE",
    "bool": "BOOLEAN",
    "timestamp": "TIMESTAMPTZ",
    "date": "DATE",
}

_WINDOW = re.compile(r"^(\d+)(s|m|h|d|w)$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
LIFETIME = "lifetime"


def window_seconds(text: str | None) -> int | None:
    """``'7d'`` -> 604800; ``'lifetime'`` (or None) -> None. Raises ValueError for anything else."""
    if text is None or text == LIFETIME:
        return None
    match = _WINDOW.match(text) if isinstance(text, str) else None
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"window {text!r} is not a duration (use e.g. '30m', '1h', '24h', '7d', '4w' or 'lifetime')")
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
