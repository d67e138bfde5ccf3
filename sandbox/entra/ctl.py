"""``python -m sandbox.entra ctl``: drive the admin API from a shell, a test or a benchmark.

It finds the emulator through ``DIR/entra.json`` (written by ``serve``) and trusts ``DIR/ca.crt``.
Every command prints the admin API's JSON answer. Examples::

    python -m sandbox.entra ctl --state-dir DIR fail login.token --status 429 --retry-after 1
    python -m sandbox.entra ctl --state-dir DIR latency 'graph.*' 0.2
    python -m sandbox.entra ctl --state-dir DIR propagation 30
    python -m sandbox.entra ctl --state-dir DIR requests --route 'arm.*'
"""

from __future__ import annotations

import argparse
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from sandbox.pki import CA_CERT_NAME


class CtlError(Exception):
    pass


class AdminClient:
    """A tiny synchronous client of the admin API (stdlib only, usable from any test)."""

    def __init__(self, url: str, ca_file: Path, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self._ssl = ssl.create_default_context(cafile=str(ca_file))
        self._timeout = timeout

    @classmethod
    def from_state_dir(cls, state_dir: Path) -> AdminClient:
        info_path = state_dir / "entra.json"
        try:
            info = json.loads(info_path.read_text())
        except (OSError, ValueError) as exc:
            raise CtlError(f"cannot read {info_path} (is the emulator running?): {exc}") from exc
        return cls(str(info["url"]), state_dir / CA_CERT_NAME)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        # The URL is always https:// (from entra.json), so no file: or custom schemes.
        request = urllib.request.Request(  # noqa: S310
            f"{self.url}/_sandbox/{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            opened = urllib.request.urlopen(  # noqa: S310
                request, context=self._ssl, timeout=self._timeout
            )
            with opened as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise CtlError(f"{method} {path}: HTTP {exc.code}: {exc.read().decode()}") from exc
        except urllib.error.URLError as exc:
            raise CtlError(f"{method} {path}: {exc.reason}") from exc

    # Convenience wrappers (the names match the CLI commands).
    def reset(self, *, state: bool = True) -> Any:
        return self.call("POST", "reset", {"state": state})

    def controls(self, **settings: float) -> Any:
        return self.call("POST", "controls", settings) if settings else self.call("GET", "controls")

    def latency(self, route: str, seconds: float, jitter: float = 0.0) -> Any:
        return self.call("POST", "latency", {"route": route, "seconds": seconds, "jitter": jitter})

    def fail(
        self, route: str, status: int = 429, count: int = 1, retry_after: float | None = None
    ) -> Any:
        body: dict[str, Any] = {"route": route, "status": status, "count": count}
        if retry_after is not None:
            body["retryAfter"] = retry_after
        return self.call("POST", "failures", body)

    def rate_limit(
        self, route: str, rate: float, burst: float = 1, *, per_target: bool = True
    ) -> Any:
        body = {"route": route, "rate": rate, "burst": burst, "perTarget": per_target}
        return self.call("POST", "ratelimits", body)

    def requests(self, route: str = "*") -> Any:
        return self.call("GET", f"requests?route={urllib.parse.quote(route)}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", type=Path, required=True, help="the sandbox state directory")
    sub = parser.add_subparsers(dest="ctl_command", required=True)
    sub.add_parser("status", help="show the current controls")
    latency = sub.add_parser("latency", help="add latency to routes matching a pattern (0 removes)")
    latency.add_argument("route")
    latency.add_argument("seconds", type=float)
    latency.add_argument(
        "--jitter", type=float, default=0.0, help="plus a uniform random 0..JITTER seconds per call"
    )
    fail = sub.add_parser("fail", help="answer the next N calls of a route with an error status")
    fail.add_argument("route")
    fail.add_argument("--status", type=int, default=429)
    fail.add_argument("--count", type=int, default=1)
    fail.add_argument("--retry-after", type=float, default=None)
    limit = sub.add_parser(
        "ratelimit", help="token-bucket limit on routes matching a pattern (rate 0 removes)"
    )
    limit.add_argument("route")
    limit.add_argument("rate", type=float, help="calls per second")
    limit.add_argument("--burst", type=float, default=1)
    limit.add_argument(
        "--global",
        dest="per_target",
        action="store_false",
        help="one bucket for all targets instead of one per identity or app",
    )
    propagation = sub.add_parser(
        "propagation", help="seconds before a new federated credential is accepted (AADSTS70021)"
    )
    propagation.add_argument("seconds", type=float)
    clock = sub.add_parser("clock", help="skew the emulator's clock by SECONDS")
    clock.add_argument("seconds", type=float)
    write = sub.add_parser("write-delay", help="seconds an ARM credential write takes")
    write.add_argument("seconds", type=float)
    lag = sub.add_parser(
        "graph-lag", help="seconds Graph reads of federated credentials miss a write (0 removes)"
    )
    lag.add_argument("seconds", type=float)
    requests = sub.add_parser("requests", help="request log and counts per route")
    requests.add_argument("--route", default="*")
    requests.add_argument("--clear", action="store_true", help="clear the log instead")
    reset = sub.add_parser("reset", help="clear controls and log; restore the world seed")
    reset.add_argument("--keep-state", action="store_true", help="keep federated credentials")
    sub.add_parser("state", help="federated credentials per principal")


def run(args: argparse.Namespace) -> Any:
    client = AdminClient.from_state_dir(args.state_dir)
    command = args.ctl_command
    if command == "status":
        return client.controls()
    if command == "latency":
        return client.latency(args.route, args.seconds, args.jitter)
    if command == "fail":
        return client.fail(args.route, args.status, args.count, args.retry_after)
    if command == "ratelimit":
        return client.rate_limit(args.route, args.rate, args.burst, per_target=args.per_target)
    if command == "propagation":
        return client.controls(propagationSeconds=args.seconds)
    if command == "clock":
        return client.controls(clockSkewSeconds=args.seconds)
    if command == "write-delay":
        return client.controls(armWriteSeconds=args.seconds)
    if command == "graph-lag":
        return client.controls(graphReadLagSeconds=args.seconds)
    if command == "requests":
        return client.call("DELETE", "requests") if args.clear else client.requests(args.route)
    if command == "reset":
        return client.reset(state=not args.keep_state)
    if command == "state":
        return client.call("GET", "state")
    raise CtlError(f"unknown command {command}")
