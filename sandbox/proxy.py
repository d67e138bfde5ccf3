"""An HTTPS CONNECT proxy that makes the Entra emulator answer for Azure's public hosts.

Unmodified client code (``ClientSecretCredential`` with its default authority, msgraph-sdk and
azure-mgmt-msi with their default endpoints, a raw ``requests.post`` to
``https://login.microsoftonline.com/...``) reaches the sandbox through ``HTTPS_PROXY`` alone. The
proxy tunnels CONNECT requests for the hosts in :data:`AZURE_HOSTS` to the Entra emulator, whose
certificate (signed by the sandbox CA) carries those names; the TLS session is end to end between
the client and the emulator, which then routes by the Host header exactly as the real hosts split
token service, Graph and ARM. Every other host gets a 403 whose body lists what the sandbox
serves: nothing ever leaves the machine. ``NO_PROXY`` keeps loopback traffic (the API server, the
TDS endpoint) direct; the ODBC driver does not use HTTP proxies anyway.

With ``--node-address`` (the host's end of the node's link, given by the launcher when the node's
network exists) the proxy also listens there, on a port of its own, so pods reach Azure's host
names the same way (``SANDBOX_POD_HTTPS_PROXY``); the tunnels still end at the Entra emulator on
loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from urllib.parse import urlsplit

AZURE_HOSTS = frozenset(
    {
        "login.microsoftonline.com",
        "login.windows.net",
        "sts.windows.net",
        "graph.microsoft.com",
        "management.azure.com",
    }
)
_MAX_HEADER = 16 * 1024


class NodeListenError(Exception):
    """The listener for pods could not be opened."""


def _refusal(host: str) -> bytes:
    body = (
        f"The sql-workload-identity sandbox proxy does not reach {host or 'that host'}: it has no "
        f"internet access. It serves only {', '.join(sorted(AZURE_HOSTS))} (through the Entra "
        "emulator). Add the host to NO_PROXY if it is local.\n"
    ).encode()
    head = (
        "HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    return head + body


class TunnelProxy:
    """Accepts ``CONNECT host:443`` and splices allowed hosts to ``target``."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.tunnels_opened = 0
        self.refused = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split()
        method = parts[0].upper() if parts else ""
        authority = parts[1] if len(parts) > 1 else ""
        if method != "CONNECT":
            # Plain-HTTP proxying: Azure's endpoints are HTTPS only, so this is never ours.
            self.refused += 1
            writer.write(_refusal(urlsplit(authority).hostname or authority))
            writer.close()
            return
        host, _, port = authority.rpartition(":")
        if host.lower() not in AZURE_HOSTS or port != "443":
            self.refused += 1
            writer.write(_refusal(host))
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            writer.close()
            return
        self.tunnels_opened += 1
        writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        await writer.drain()
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
    except ConnectionError:
        pass
    finally:
        with contextlib.suppress(Exception):
            dst.close()


async def serve(
    state_dir: Path, port: int, entra_port: int, node_address: str | None = None
) -> None:
    proxy = TunnelProxy(entra_port)
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", port, limit=_MAX_HEADER)
    bound = server.sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{bound}"
    env = {
        "HTTPS_PROXY": url,
        "https_proxy": url,
        "NO_PROXY": "localhost,127.0.0.1,::1",
        "no_proxy": "localhost,127.0.0.1,::1",
    }
    servers = [server]
    if node_address is not None:
        # For pods: the same tunnels, on the host's end of the node's link.
        try:
            pod_server = await asyncio.start_server(
                proxy.handle, node_address, 0, limit=_MAX_HEADER
            )
        except OSError as exc:
            server.close()
            raise NodeListenError(
                f"cannot listen on {node_address} ({exc.strerror}): is the node's network up? "
                "`python -m sandbox down` and `up` again"
            ) from exc
        servers.append(pod_server)
        pod_port = pod_server.sockets[0].getsockname()[1]
        env["SANDBOX_POD_HTTPS_PROXY"] = f"http://{node_address}:{pod_port}"
    info = {
        "name": "proxy",
        "pid": os.getpid(),
        "url": url,
        "port": bound,
        "env": env,
    }
    tmp = state_dir / "proxy.json.tmp"
    tmp.write_text(json.dumps(info, indent=2))
    tmp.replace(state_dir / "proxy.json")
    print(f"READY url={url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with contextlib.AsyncExitStack() as listening:
        for each in servers:
            await listening.enter_async_context(each)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sandbox.proxy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("serve", help="run the proxy in the foreground")
    run.add_argument("--state-dir", type=Path, required=True)
    run.add_argument("--port", type=int, default=0, help="listen port (0: a free one)")
    run.add_argument("--entra-port", type=int, help="default: read from STATE/entra.json")
    run.add_argument(
        "--node-address", help="also listen here for pods (the host's end of the node's link)"
    )
    args = parser.parse_args(argv)
    entra_port = args.entra_port
    if entra_port is None:
        try:
            entra_port = int(json.loads((args.state_dir / "entra.json").read_text())["port"])
        except (OSError, ValueError, KeyError):
            print(
                "error: the Entra emulator is not running in this state directory: start it "
                "first (`python -m sandbox up`) or pass --entra-port",
                file=sys.stderr,
            )
            return 2
    try:
        asyncio.run(serve(args.state_dir, args.port, entra_port, args.node_address))
    except NodeListenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(
            f"error: cannot listen on 127.0.0.1:{args.port} ({exc.strerror}): choose another "
            "--port or stop what holds it",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
