"""T-SQL types to TDS wire types, and the SQLite side of them.

Declared column types (kept from ``CREATE TABLE``) and the types sqlglot's annotator derives for
expressions become :class:`~sandbox.azuresql.tds.SqlType`; values SQLite stores loosely are checked
against them and the type is widened (or inferred from the values) when they do not fit.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from sqlglot import exp

from sandbox.azuresql import tds

_T = exp.DataType.Type


def _type_params(data_type: exp.DataType) -> list[int | None]:
    out: list[int | None] = []
    for param in data_type.expressions:
        text = param.name if isinstance(param, exp.DataTypeParam) else param.sql()
        out.append(None if text.upper() == "MAX" else int(text) if text.isdigit() else None)
    return out


def sql_type_for(data_type: exp.DataType) -> tds.SqlType | None:
    """The wire type for a T-SQL type; None when unknown (the caller infers from values)."""
    kind = data_type.this
    params = _type_params(data_type)
    first = params[0] if params else 1
    ints = {_T.TINYINT: 1, _T.UTINYINT: 1, _T.SMALLINT: 2, _T.INT: 4, _T.BIGINT: 8}
    if kind in ints:
        return tds.SqlType(tds.Kind.INT, ints[kind])
    if kind in (_T.BIT, _T.BOOLEAN):
        return tds.BIT
    if kind in (_T.FLOAT, _T.DOUBLE):
        return tds.FLOAT
    if kind in (_T.DECIMAL, _T.MONEY, _T.SMALLMONEY):
        precision = params[0] if params and params[0] else 19 if kind == _T.MONEY else 18
        scale = (
            params[1]
            if len(params) > 1 and params[1] is not None
            else (4 if kind in (_T.MONEY, _T.SMALLMONEY) else 0)
        )
        return tds.SqlType(tds.Kind.DECIMAL, None, precision, scale)
    if kind in (_T.VARCHAR, _T.CHAR, _T.TEXT):
        size = None if kind == _T.TEXT or first is None or first > 8000 else first
        return tds.SqlType(tds.Kind.VARCHAR, size)
    if kind in (_T.NVARCHAR, _T.NCHAR):
        return tds.nvarchar(first)
    if kind in (_T.VARBINARY, _T.BINARY):
        return tds.SqlType(tds.Kind.VARBINARY, None if first is None or first > 8000 else first)
    if kind in (_T.DATETIME, _T.SMALLDATETIME):
        return tds.SqlType(tds.Kind.DATETIME, 8)
    if kind in (_T.DATETIME2, _T.TIMESTAMP):
        return tds.SqlType(tds.Kind.DATETIME2, None, scale=params[0] if params and params[0] else 7)
    if kind == _T.DATE:
        return tds.SqlType(tds.Kind.DATE, 3)
    if kind == _T.TIME:
        return tds.SqlType(tds.Kind.TIME, None, scale=params[0] if params and params[0] else 7)
    if kind == _T.UUID:
        return tds.SqlType(tds.Kind.GUID, 16)
    return None


def sqlite_affinity(data_type: exp.DataType) -> str:
    kind = data_type.this
    if kind in exp.DataType.INTEGER_TYPES or kind in (_T.BIT, _T.BOOLEAN):
        return "INTEGER"
    if kind in exp.DataType.REAL_TYPES or kind in (_T.MONEY, _T.SMALLMONEY):
        return "REAL"
    if kind in (_T.VARBINARY, _T.BINARY):
        return "BLOB"
    return "TEXT"


def infer_type(values: Sequence[Any]) -> tds.SqlType:
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, int) for v in present):
        fits = all(-(2**31) <= v < 2**31 for v in present)
        return tds.INT if fits else tds.BIGINT
    if present and all(isinstance(v, int | float) for v in present):
        return tds.FLOAT
    if present and all(isinstance(v, bytes) for v in present):
        longest = max(len(v) for v in present)
        return tds.SqlType(tds.Kind.VARBINARY, None if longest > 8000 else max(longest, 1))
    longest = max((len(str(v)) for v in present), default=1)
    return tds.nvarchar(longest)


def fit_type(sql_type: tds.SqlType, values: Sequence[Any]) -> tds.SqlType:
    """Widen a declared type that the stored values do not fit (SQLite does not enforce types)."""
    try:
        for value in values:
            tds.encode_value(sql_type, value)
    except (ValueError, TypeError, OverflowError, ArithmeticError, tds.ProtocolError):
        return infer_type([None if v is None else str(v) for v in values])
    if sql_type.kind in (tds.Kind.VARCHAR, tds.Kind.NVARCHAR, tds.Kind.VARBINARY) and sql_type.size:
        unit = 2 if sql_type.kind == tds.Kind.NVARCHAR else 1
        longest = max(
            (len(v if isinstance(v, bytes) else str(v)) * unit for v in values if v is not None),
            default=0,
        )
        if longest > sql_type.size:
            limit = 8000
            return tds.SqlType(sql_type.kind, longest if longest <= limit else None)
    return sql_type


def to_sqlite(value: Any) -> Any:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float | str | bytes) or value is None:
        return value
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat(sep=" ") if isinstance(value, dt.datetime) else value.isoformat()
    return str(value)
