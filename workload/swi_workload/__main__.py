"""``python -m swi_workload``: run one query as the pod's federated identity and print the rows.

Configured by the environment (see ``settings.py``); flags override the query and the output.
Exit codes (also in docs/workload.md): 0 rows printed; 2 misconfigured; 3 not federated (no
token file); 4 no matching federated credential (AADSTS70021); 5 token service error; 6 no
database user; 7 token rejected by the server; 8 permission denied (229); 9 server unreachable;
10 database unavailable after retries; 11 query failed; 1 anything else.
"""

from __future__ import annotations

import argparse
import datetime as dt
import decimal
import json
import sys
import time
import uuid
from dataclasses import replace
from typing import Any, TextIO

from swi_workload.client import QueryResult, SqlClient
from swi_workload.errors import WorkloadError
from swi_workload.settings import DEFAULT_QUERY, ENCRYPT_MODES, Backoff, Settings


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


def render_json(result: QueryResult, out: TextIO) -> None:
    rows = [
        {c: _json_value(v) for c, v in zip(result.columns, row, strict=True)} for row in result.rows
    ]
    json.dump({"columns": result.columns, "rows": rows, "rowcount": len(rows)}, out, indent=2)
    out.write("\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m swi_workload",
        description="Query Azure SQL as this pod's federated identity (no secrets).",
        epilog="Environment: AZURE_CLIENT_ID, AZURE_TENANT_ID, AZURE_FEDERATED_TOKEN_FILE, "
        "AZURE_AUTHORITY_HOST (set by the identity webhook) or AZ_CLIENT_ID/AZ_TENANT_ID, and "
        "AZ_SERVER, AZ_DATABASE.",
    )
    parser.add_argument("--query", "-q", default=DEFAULT_QUERY, help="T-SQL, ? for parameters")
    parser.add_argument("--param", "-p", action="append", default=[], help="a ? parameter value")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--encrypt", choices=ENCRYPT_MODES, help="strict = TDS 8.0")
    parser.add_argument("--repeat", type=int, default=1, help="run the query N times (warm)")
    parser.add_argument("--interval", type=float, default=0.0, help="seconds between repeats")
    parser.add_argument("--retries", type=int, help="attempts for transient failures (5)")
    parser.add_argument("--retry-delay", type=float, help="first backoff delay in seconds (5)")
    parser.add_argument("--login-timeout", type=int, help="seconds to wait for a login (30)")
    parser.add_argument("--verbose", "-v", action="store_true", help="timings on stderr")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    try:
        settings = Settings.from_env()
        if args.encrypt:
            settings = replace(settings, encrypt=args.encrypt)
        if args.login_timeout:
            settings = replace(settings, login_timeout_s=args.login_timeout)
        if args.retries is not None or args.retry_delay is not None:
            base = settings.backoff
            settings = replace(
                settings,
                backoff=Backoff(
                    attempts=args.retries if args.retries is not None else base.attempts,
                    first=args.retry_delay if args.retry_delay is not None else base.first,
                    cap=base.cap,
                ),
            )
        with SqlClient(settings) as client:
            for index in range(max(args.repeat, 1)):
                if index:
                    time.sleep(args.interval)
                began = time.perf_counter()
                result = client.query(args.query, *args.param)
                if args.verbose:
                    print(
                        f"query {index + 1}: {1000 * (time.perf_counter() - began):.1f} ms "
                        f"(connects={client.stats.connects}, "
                        f"token requests={client.stats.token_requests}, "
                        f"retries={client.stats.retries})",
                        file=sys.stderr,
                    )
    except WorkloadError as error:
        if args.json:
            json.dump(
                {"error": error.reason, "message": str(error), "exitCode": error.exit_code},
                sys.stdout,
            )
            sys.stdout.write("\n")
        print(f"error: {error.reason}: {error}", file=sys.stderr)
        return error.exit_code
    if args.json:
        render_json(result, sys.stdout)
    else:
        render_table(result, sys.stdout)
    if args.verbose:
        print(f"total: {1000 * (time.perf_counter() - started):.1f} ms", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
