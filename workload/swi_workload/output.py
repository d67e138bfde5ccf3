"""How query results are printed: a table for people, JSON for programs (both modes)."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import uuid
from typing import Any, TextIO

from swi_workload.client import QueryResult


def _json_value(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return "0x" + value.hex().upper()
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, decimal.Decimal | uuid.UUID):
        return str(value)
    return value


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bytes | bytearray):
        return "0x" + value.hex().upper()
    return str(value)


def render_table(result: QueryResult, out: TextIO) -> None:
    headers = [c or f"(column {i + 1})" for i, c in enumerate(result.columns)]
    cells = [[_cell(v) for v in row] for row in result.rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    out.write("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip() + "\n")
    out.write("  ".join("-" * w for w in widths) + "\n")
    for row in cells:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")
    noun = "row" if len(result.rows) == 1 else "rows"
    out.write(f"({len(result.rows)} {noun})\n")


def result_json(result: QueryResult) -> dict[str, Any]:
    rows = [
        {c: _json_value(v) for c, v in zip(result.columns, row, strict=True)} for row in result.rows
    ]
    return {"columns": result.columns, "rows": rows, "rowcount": len(rows)}


def render_json(result: QueryResult, out: TextIO) -> None:
    json.dump(result_json(result), out, indent=2)
    out.write("\n")
