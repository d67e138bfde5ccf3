"""``python -m swi_workload``: run one query as the pod's federated identity and print the rows
(a Job's process); ``python -m swi_workload serve`` is the long-running mode for a Deployment
(``serve.py``).

Configured by the environment (see ``settings.py``); flags override the query and the output. The
query (``--query`` or ``AZ_QUERY``) has no default.
Exit codes (also in docs/workload.md): 0 rows printed; 2 misconfigured; 3 not federated (no
token file); 4 no matching federated credential (AADSTS70021); 5 token service error; 6 no
database user; 7 token rejected by the server; 8 permission denied (229); 9 server unreachable;
10 database unavailable after retries; 11 query failed; 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from importlib import metadata

from swi_workload.client import SqlClient
from swi_workload.errors import ConfigurationError, WorkloadError
from swi_workload.output import render_json, render_table
from swi_workload.settings import ENCRYPT_MODES, Backoff, Settings


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m swi_workload",
        description="Query Azure SQL as this pod's federated identity (no secrets).",
        epilog="Environment: AZURE_CLIENT_ID, AZURE_TENANT_ID, AZURE_FEDERATED_TOKEN_FILE, "
        "AZURE_AUTHORITY_HOST (set by the identity webhook) or AZ_CLIENT_ID/AZ_TENANT_ID, and "
        "AZ_SERVER, AZ_DATABASE, AZ_QUERY. `swi-workload serve --help`: the long-running mode "
        "for a Deployment.",
    )
    parser.add_argument("--query", "-q", help="T-SQL, ? for parameters (or AZ_QUERY; required)")
    parser.add_argument("--param", "-p", action="append", default=[], help="a ? parameter value")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--encrypt", choices=ENCRYPT_MODES, help="strict = TDS 8.0")
    parser.add_argument("--repeat", type=int, default=1, help="run the query N times (warm)")
    parser.add_argument("--interval", type=float, default=0.0, help="seconds between repeats")
    parser.add_argument("--retries", type=int, help="attempts for transient failures (5)")
    parser.add_argument("--retry-delay", type=float, help="first backoff delay in seconds (5)")
    parser.add_argument("--login-timeout", type=int, help="seconds to wait for a login (30)")
    parser.add_argument("--verbose", "-v", action="store_true", help="timings on stderr")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    return parser.parse_args(argv)


def version() -> str:
    """The installed distribution's version (the image installs it with pip)."""
    try:
        return metadata.version("sql-workload-identity-operator")
    except metadata.PackageNotFoundError:  # a source tree that was never installed
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        from swi_workload import serve

        return serve.main(argv[1:])
    args = parse_args(argv)
    started = time.perf_counter()
    try:
        settings = Settings.from_env()
        query = args.query or settings.query
        if not query:
            raise ConfigurationError(
                "no query: pass --query 'SELECT ...' or set AZ_QUERY (nothing is assumed about "
                "your tables)"
            )
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
                result = client.query(query, *args.param)
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
