"""``swi-workload serve``: the workload as a Deployment's long-running process.

The one-shot mode (``python -m swi_workload``) prints the rows and exits, which suits a Job; as a
Deployment it would exit and crash-loop. ``serve`` keeps one ``SqlClient`` for its lifetime and
answers on one HTTP port (the standard library's threading server: three GET routes need no
framework):

* ``GET /healthz``: liveness. 200 while the process runs, with the query client's counters
  (queries, connections opened, token requests); says nothing about Entra or SQL, so a slow
  database never gets the pod restarted.
* ``GET /readyz``: readiness. 200 when the identity chain works: a token can be had (the
  credential's cache, or Entra when it is due) and a SQL login works (a ``SELECT 1`` on a
  connection of its own, opened with that token, reopened before the token expires). 503 with the
  failure's reason and message otherwise. The answer is cached for ``--ready-cache`` seconds, so
  probes from the kubelet (and people) cost at most one check per period.
* ``GET /query``: runs the configured query now and answers the rows as JSON (503 and the reason
  on failure).

With ``--every SECONDS`` the query also runs on that schedule and its rows are printed (a table,
or one JSON document per run with ``--json``); a failure is printed to stderr and the schedule
goes on. The query comes from ``--query`` or ``AZ_QUERY``; there is no default (the demo passes
the seed's).

Tokens over hours: azure-identity's ``WorkloadIdentityCredential`` re-reads the projected token
file and asks Entra again when its cached token nears expiry, and ``SqlClient`` reopens its
connection ``--recycle-margin`` seconds before the token it logged in with expires, so the process
runs for days without a restart (tests/workload/test_workload_serve.py drives it through several
token lifetimes with the Entra emulator's clock).

SIGTERM or SIGINT: stop taking requests, let a running query finish, close the connections and
exit 0 (within the pod's termination grace).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from swi_workload.client import QueryResult, SqlClient
from swi_workload.errors import ConfigurationError, WorkloadError
from swi_workload.output import render_table, result_json
from swi_workload.settings import ENCRYPT_MODES, Backoff, Settings
from swi_workload.tokens import TokenSource

READY_QUERY = "SELECT 1"


@dataclass(frozen=True)
class Check:
    ok: bool
    reason: str
    message: str

    def as_json(self) -> dict[str, Any]:
        return {"ready": self.ok, "reason": self.reason, "message": self.message}


class Readiness:
    """The identity chain's health, checked at most once per ``ttl`` seconds."""

    def __init__(
        self,
        tokens: TokenSource,
        probe: SqlClient,
        ttl: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._tokens = tokens
        self._probe = probe
        self._ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._last: tuple[float, Check] | None = None
        self.checks = 0

    def check(self) -> Check:
        with self._lock:  # concurrent probes wait for one check instead of each making one
            if self._last is not None and self._clock() - self._last[0] < self._ttl:
                return self._last[1]
            self.checks += 1
            try:
                self._tokens.get()
                self._probe.query(READY_QUERY)
            except WorkloadError as error:
                result = Check(False, error.reason, str(error))
            else:
                result = Check(True, "Ready", "a token was had and a SQL login works")
            self._last = (self._clock(), result)
            return result


class Service:
    """The client, the readiness check, the schedule; the HTTP handler and ``main`` drive it."""

    def __init__(
        self,
        settings: Settings,
        query: str | None,
        params: list[str],
        ready_ttl: float,
        tokens: TokenSource | None = None,
    ) -> None:
        self.stopping = threading.Event()
        self.tokens = tokens or TokenSource(settings)
        # Backoff sleeps end early at shutdown.
        self.client = SqlClient(settings, tokens=self.tokens, sleep=self._pause)
        # The probe answers quickly: one attempt, never the schedule's backoff.
        probe_settings = replace(settings, backoff=Backoff(attempts=1))
        self.probe = SqlClient(probe_settings, tokens=self.tokens, sleep=self._pause)
        self.readiness = Readiness(self.tokens, self.probe, ready_ttl)
        self.query_text = query
        self.params = params

    def _pause(self, seconds: float) -> None:
        self.stopping.wait(seconds)

    def run_query(self) -> QueryResult:
        if not self.query_text:
            raise ConfigurationError("no query configured: pass --query or set AZ_QUERY")
        return self.client.query(self.query_text, *self.params)

    def close(self) -> None:
        self.client.close()
        self.probe.close()


def _handler(service: Service) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self, status: int, body: dict[str, Any]) -> None:
            data = (json.dumps(body) + "\n").encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                stats = service.client.stats
                self._answer(
                    200,
                    {
                        "alive": True,
                        "queries": stats.queries,
                        "connects": stats.connects,  # one login (and one token) each
                        "tokenRequests": stats.token_requests,
                    },
                )
            elif path == "/readyz":
                check = service.readiness.check()
                self._answer(200 if check.ok else 503, check.as_json())
            elif path == "/query":
                try:
                    result = service.run_query()
                except WorkloadError as error:
                    status = 400 if isinstance(error, ConfigurationError) else 503
                    self._answer(status, {"error": error.reason, "message": str(error)})
                    return
                self._answer(200, result_json(result))
            else:
                routes = ["/healthz", "/readyz", "/query"]
                self._answer(404, {"error": "NotFound", "routes": routes})

        def log_message(self, format: str, *args: Any) -> None:
            pass  # probes every few seconds would drown the query output

    return Handler


def _schedule(service: Service, every: float, as_json: bool) -> None:
    while not service.stopping.is_set():
        try:
            result = service.run_query()
        except WorkloadError as error:
            print(f"error: {error.reason}: {error}", file=sys.stderr, flush=True)
        else:
            if as_json:
                print(json.dumps(result_json(result)), flush=True)
            else:
                render_table(result, sys.stdout)
                sys.stdout.flush()
        service.stopping.wait(every)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="swi-workload serve",
        description="Serve liveness, readiness and queries over HTTP, as this pod's federated "
        "identity; optionally run the query on a schedule.",
    )
    parser.add_argument("--query", "-q", help="T-SQL, ? for parameters [AZ_QUERY]")
    parser.add_argument("--param", "-p", action="append", default=[], help="a ? parameter value")
    parser.add_argument("--every", type=float, help="run the query every SECONDS and print it")
    parser.add_argument("--json", action="store_true", help="scheduled output as JSON lines")
    parser.add_argument("--addr", default="0.0.0.0", help="listen address (0.0.0.0)")
    parser.add_argument("--port", type=int, default=8080, help="listen port (8080; 0: any)")
    parser.add_argument(
        "--ready-cache", type=float, default=5.0, help="seconds a readiness answer is reused (5)"
    )
    parser.add_argument(
        "--recycle-margin",
        type=float,
        help="reconnect this many seconds before the login token expires (300)",
    )
    parser.add_argument("--encrypt", choices=ENCRYPT_MODES, help="strict = TDS 8.0")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = Settings.from_env()
        if args.encrypt:
            settings = replace(settings, encrypt=args.encrypt)
        if args.recycle_margin is not None:
            settings = replace(settings, recycle_margin_s=args.recycle_margin)
        query = args.query or settings.query
        if args.every is not None and (args.every <= 0 or not query):
            raise ConfigurationError(
                "--every needs a positive number of seconds and a query (--query or AZ_QUERY)"
            )
        service = Service(settings, query, args.param, args.ready_cache)
    except WorkloadError as error:
        print(f"error: {error.reason}: {error}", file=sys.stderr)
        return error.exit_code
    try:
        server = ThreadingHTTPServer((args.addr, args.port), _handler(service))
    except OSError as exc:
        where = f"{args.addr}:{args.port}"
        print(f"error: Misconfigured: cannot listen on {where}: {exc}", file=sys.stderr)
        return ConfigurationError.exit_code
    server.daemon_threads = True

    def stop(signum: int, _frame: Any) -> None:
        service.stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    serving = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    serving.start()
    scheduled = (
        threading.Thread(
            target=_schedule, args=(service, args.every, args.json), name="schedule", daemon=True
        )
        if args.every
        else None
    )
    if scheduled is not None:
        scheduled.start()
    host, port = server.server_address[:2]
    routes = "/healthz, /readyz, /query"
    print(f"serving on http://{host!s}:{port} ({routes})", file=sys.stderr, flush=True)
    while not service.stopping.wait(1.0):  # a timed wait: signal handlers run in between
        pass
    server.shutdown()
    if scheduled is not None:
        scheduled.join(timeout=30)
    service.close()
    server.server_close()
    print("stopped", file=sys.stderr, flush=True)
    return 0
