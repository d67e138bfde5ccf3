"""``python -m sandbox.azuresql``: run the Azure SQL emulator (``serve``) or steer it (``ctl``).

``serve --state-dir DIR [--world PATH] [--entra-url URL] [--node-address ADDR]`` starts every
server of the world's ``sql:`` section on its own loopback port (the ports of a previous run are
reused when free, so a restart keeps ``AZ_SERVER`` valid; with ``--node-address`` also on ADDR,
for pods that dial ``<server>.database.windows.net``: the first server on Azure's port 1433, any
other on its loopback port), seeds missing databases under
``DIR/azuresql/<server>/``, registers the ODBC driver in ``DIR/odbc/odbcinst.ini``, writes
``DIR/azuresql.json`` and prints one ``READY servers=name:port,...`` line. SIGTERM or SIGINT:
clean exit 0 (``azuresql.json`` removed). A start-up problem: one ``error: ...`` line on stderr,
exit 2.

``ctl --state-dir DIR status | fail-logins SERVER [--count N] [--error 40613] |
reset-connections SERVER [--logins N] [--results N] | stop SERVER |
start SERVER | log [--server NAME] [--json] [--clear]`` talks to the admin endpoint (admin.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import signal
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from aiohttp import web

from sandbox.azuresql import admin
from sandbox.azuresql.config import DEFAULT_WORLD, ConfigError, load_world
from sandbox.azuresql.login import TokenVerifier
from sandbox.azuresql.odbc import DriverNotFound, write_odbcinst
from sandbox.azuresql.server import EmulatedServer, build_server
from sandbox.azuresql.tls import server_contexts
from sandbox.pki import ensure_ca

STATE_FILE = "azuresql.json"
PORTS_FILE = "ports.json"  # under DIR/azuresql: remembered so a restart keeps AZ_SERVER valid
EXIT_STARTUP = 2


class StartupError(Exception):
    pass


def _entra_url(state_dir: Path, explicit: str | None) -> str:
    if explicit:
        return explicit
    path = state_dir / "entra.json"
    try:
        return str(json.loads(path.read_text())["url"])
    except (OSError, ValueError, KeyError) as exc:
        raise StartupError(
            f"no Entra emulator: {path} is missing or has no url; start "
            "`python -m sandbox.entra serve` first or pass --entra-url"
        ) from exc


def _previous_ports(ports_file: Path) -> dict[str, int]:
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        return {str(name): int(port) for name, port in json.loads(ports_file.read_text()).items()}
    return {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


async def _start(args: argparse.Namespace) -> tuple[list[EmulatedServer], web.AppRunner, str]:
    state_dir: Path = args.state_dir.resolve()
    entra_url = _entra_url(state_dir, args.entra_url)
    specs = load_world(args.world)
    ca = ensure_ca(state_dir)
    data_dir = state_dir / "azuresql"
    data_dir.mkdir(parents=True, exist_ok=True)
    # Local clients dial localhost; pods dial the server's public name, which their hostAliases
    # resolve to the node address.
    cert, key = ca.issue(
        data_dir,
        "azuresql",
        dns_names=["localhost", *(pod_host_name(spec.name) for spec in specs)],
        ip_addresses=["127.0.0.1", *([args.node_address] if args.node_address else [])],
    )
    contexts = server_contexts(cert, key)
    verifier = TokenVerifier(entra_url, ca.cert_path)
    previous = _previous_ports(data_dir / PORTS_FILE)
    servers = []
    for index, spec in enumerate(specs):
        server = await asyncio.to_thread(
            build_server,
            spec,
            data_dir,
            verifier,
            contexts,
            entra_url,
            ca.cert_path,
            previous.get(spec.name, 0),
            args.node_address,
            AZURE_SQL_PORT if index == 0 else None,
        )
        try:
            await server.start()
        except OSError:
            server.port = 0  # the old port is taken: any free one will do
            await server.start()
        servers.append(server)
    runner = web.AppRunner(admin.build_app({s.name: s for s in servers}), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    admin_port = runner.addresses[0][1]
    return servers, runner, f"http://127.0.0.1:{admin_port}"


# Azure SQL's port: the first server listens on it at the node address (the sandbox's own).
AZURE_SQL_PORT = 1433


def pod_host_name(server: str) -> str:
    """The name pods dial a server by (as on Azure), resolved by their hostAliases."""
    return f"{server}.database.windows.net"


def _state(
    args: argparse.Namespace, servers: list[EmulatedServer], admin_url: str, odbc_dir: Path | None
) -> dict[str, Any]:
    first = servers[0]
    env = {
        "AZ_SERVER": f"tcp:localhost,{first.port}",
        "AZ_DATABASE": first.spec.databases[0].name,
        "SWI_AZURESQL_ADMIN_URL": admin_url,
    }
    if args.node_address:
        env["SANDBOX_POD_SQL_HOST"] = pod_host_name(first.name)
        env["SANDBOX_POD_AZ_SERVER"] = f"tcp:{pod_host_name(first.name)},{first.pod_port}"
    if odbc_dir is not None:
        env["ODBCSYSINI"] = str(odbc_dir)
    return {
        "name": "azuresql",
        "pid": os.getpid(),
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "admin_url": admin_url,
        "servers": {
            s.name: {
                "port": s.port,
                "server": f"tcp:localhost,{s.port}",
                **(
                    {"podServer": f"tcp:{pod_host_name(s.name)},{s.pod_port}"}
                    if args.node_address
                    else {}
                ),
                "tenant": s.spec.tenant,
                "databases": [d.name for d in s.spec.databases],
            }
            for s in servers
        },
        "env": env,
    }


async def _serve(args: argparse.Namespace) -> int:
    state_dir: Path = args.state_dir.resolve()
    try:
        state_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 (once, before serving)
        try:
            odbc_dir: Path | None = write_odbcinst(state_dir / "odbc").parent
        except DriverNotFound as exc:
            print(f"warning: {exc}; ODBCSYSINI not exported", file=sys.stderr)
            odbc_dir = None
        servers, runner, admin_url = await _start(args)
    except (StartupError, ConfigError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_STARTUP
    _write_json(state_dir / STATE_FILE, _state(args, servers, admin_url, odbc_dir))
    _write_json(state_dir / "azuresql" / PORTS_FILE, {s.name: s.port for s in servers})
    ports = ",".join(f"{s.name}:{s.port}" for s in servers)
    print(f"READY servers={ports}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for server in servers:
        await server.stop()
    await runner.cleanup()
    (state_dir / STATE_FILE).unlink(missing_ok=True)
    return 0


# --- ctl -----------------------------------------------------------------------------------------


def _admin_url(state_dir: Path) -> str:
    path = state_dir / STATE_FILE
    try:
        return str(json.loads(path.read_text())["admin_url"])
    except (OSError, ValueError, KeyError) as exc:
        raise SystemExit(
            f"error: {path} not found: is `python -m sandbox.azuresql serve` "
            "running with this state dir?"
        ) from exc


def _call(base: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    if not base.startswith("http://127.0.0.1:"):
        raise SystemExit(f"error: unexpected admin URL {base!r} in {STATE_FILE}")
    request = urllib.request.Request(  # noqa: S310 (loopback http only, checked above)
        base + path, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise SystemExit(f"error: {exc.read().decode(errors='replace')}") from exc
    except urllib.error.URLError as exc:
        raise SystemExit(
            f"error: the emulator's admin endpoint is unreachable ({exc.reason})"
        ) from exc


def _ctl(args: argparse.Namespace) -> int:
    base = _admin_url(args.state_dir)
    if args.action == "status":
        result = _call(base, "GET", "/servers")
    elif args.action == "fail-logins":
        result = _call(
            base,
            "POST",
            f"/servers/{args.server}/fail-logins",
            {"count": args.count, "error": args.error},
        )
    elif args.action == "reset-connections":
        result = _call(
            base,
            "POST",
            f"/servers/{args.server}/reset-connections",
            {"logins": args.logins, "results": args.results},
        )
    elif args.action in ("stop", "start"):
        result = _call(base, "POST", f"/servers/{args.server}/{args.action}")
    elif args.clear:
        result = _call(base, "DELETE", "/log")
    else:
        query = f"?server={args.server}" if args.server else ""
        result = _call(base, "GET", f"/log{query}")
        if not args.json:
            for entry in result:
                when = dt.datetime.fromtimestamp(entry["ts"]).strftime("%H:%M:%S.%f")[:-3]
                error = f" -> error {entry['error']}" if entry["error"] is not None else ""
                print(
                    f"{when} {entry['server']}/{entry['database']} {entry['user'] or '-'} "
                    f"{entry['kind']}: {entry['text']}{error}"
                )
            return 0
    print(json.dumps(result, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sandbox.azuresql", description="The sandbox's Azure SQL endpoint emulator."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="start every server of the world")
    serve.add_argument("--state-dir", type=Path, required=True)
    serve.add_argument("--world", type=Path, default=DEFAULT_WORLD)
    serve.add_argument("--entra-url", help="the Entra emulator (default: url in DIR/entra.json)")
    serve.add_argument(
        "--node-address",
        help="also listen here, each server on its port, for pods (the node link's host end)",
    )
    ctl = commands.add_parser("ctl", help="test controls of a running emulator")
    ctl.add_argument("--state-dir", type=Path, required=True)
    actions = ctl.add_subparsers(dest="action", required=True)
    actions.add_parser("status", help="servers, ports, faults and database users")
    fail = actions.add_parser("fail-logins", help="make the next N logins fail transiently")
    fail.add_argument("server")
    fail.add_argument("--count", type=int, default=1)
    fail.add_argument("--error", type=int, default=40613)
    reset = actions.add_parser(
        "reset-connections", help="reset (TCP RST) the next connections mid-login or mid-result"
    )
    reset.add_argument("server")
    reset.add_argument("--logins", type=int, default=0, help="right after LOGIN7 arrives")
    reset.add_argument("--results", type=int, default=0, help="halfway through a batch's reply")
    for name in ("stop", "start"):
        actions.add_parser(name, help=f"{name} a server (same port)").add_argument("server")
    log = actions.add_parser("log", help="the query log")
    log.add_argument("--server")
    log.add_argument("--json", action="store_true")
    log.add_argument("--clear", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "serve":
        return asyncio.run(_serve(args))
    return _ctl(args)


if __name__ == "__main__":
    sys.exit(main())
