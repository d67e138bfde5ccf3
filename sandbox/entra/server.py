"""Assembling and running the emulator: one asyncio process, one HTTPS port.

``serve`` implements the sandbox service contract the launcher relies on:
1. load the world (``--world``) and optional snapshot, and the token-signing key from the state
   directory (created on first start);
2. issue a serving certificate from the sandbox CA (``sandbox.pki``) whose SANs are ``localhost``,
   ``127.0.0.1`` and the Azure host names the CONNECT proxy forwards here, plus ``--san`` extras;
3. listen on 127.0.0.1 (``--port 0`` picks a free port), write ``DIR/entra.json`` with the URL and
   the environment a client needs, print ``READY url=...`` and serve until SIGTERM/SIGINT;
4. on a start-up failure print one ``error: ...`` line on stderr and return 2.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import sys
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from sandbox.entra import admin, arm, graph, login
from sandbox.entra.admin import AdminService
from sandbox.entra.arm import ArmService
from sandbox.entra.faults import Controls
from sandbox.entra.graph import GraphService
from sandbox.entra.login import LoginService
from sandbox.entra.oidc import IssuerKeys, outbound_ssl_context
from sandbox.entra.routing import LOGIN_HOSTS, PUBLIC_HOSTS, Router, Surface
from sandbox.entra.state import (
    DEFAULT_WORLD,
    DEMO_APP,
    Directory,
    Principal,
    World,
    WorldError,
    load_world,
)
from sandbox.entra.tokens import SigningKey
from sandbox.pki import CA_CERT_NAME, ensure_ca

SERVICE_NAME = "entra"
DEFAULT_SANS = ("localhost", *sorted(PUBLIC_HOSTS))
SIGNING_KEY_NAME = "entra-signing.key"


@dataclass
class ServeOptions:
    state_dir: Path
    world: Path = DEFAULT_WORLD
    port: int = 0
    snapshot: Path | None = None
    extra_sans: list[str] = field(default_factory=list)
    demo_app: str = DEMO_APP


@dataclass
class Emulator:
    """The wired-up services; tests and ``serve`` share this."""

    directory: Directory
    controls: Controls
    issuer_keys: IssuerKeys
    app: web.Application


def build(
    world: World,
    key: SigningKey,
    ca_file: Path | None,
    served_hosts: list[str],
    snapshot: Path | None = None,
) -> Emulator:
    directory = Directory(world, snapshot)
    controls = Controls()
    issuer_keys = IssuerKeys(outbound_ssl_context(ca_file))
    router = Router(
        controls,
        {
            Surface.LOGIN: login.render_error,
            Surface.GRAPH: graph.render_error,
            Surface.ARM: arm.render_error,
            Surface.ADMIN: admin.render_error,
        },
    )
    AdminService(directory, controls, issuer_keys).register(router)
    GraphService(directory, key, controls).register(router)
    ArmService(directory, key, controls).register(router)
    LoginService(directory, key, controls, issuer_keys, served_hosts).register(router)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", router.dispatch)

    async def close_clients(_: web.Application) -> None:
        await issuer_keys.close()

    app.on_cleanup.append(close_clients)
    return Emulator(directory, controls, issuer_keys, app)


def demo_application(world: World, name: str) -> Principal:
    """The app whose secret ``AZ_CLIENT_SECRET`` exports (the seed's SP-AZURESQL-USER)."""
    demo = next((p for p in world.principals if p.name == name), None)
    if demo is None or not demo.secrets:
        raise WorldError(f"the world has no application '{name}' with a client secret")
    return demo


def client_env(world: World, url: str, demo: Principal) -> dict[str, str]:
    """The variables a client of the emulator needs (merged into ``python -m sandbox env``)."""
    return {
        "AZURE_AUTHORITY_HOST": url,
        "SANDBOX_ENTRA_URL": url,
        "SANDBOX_GRAPH_URL": f"{url}/v1.0",
        "SANDBOX_ARM_URL": url,
        "AZURE_TENANT_ID": demo.tenant_id,
        "AZ_TENANT_ID": demo.tenant_id,
        "AZ_CLIENT_ID": demo.client_id,
        "AZ_CLIENT_SECRET": demo.secrets[0],
        "SANDBOX_SUBSCRIPTION_ID": world.subscription_id,
    }


def _write_json(path: Path, document: dict[str, object]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(document, indent=2) + "\n")
    tmp.replace(path)


async def _serve(options: ServeOptions) -> int:
    state_dir = options.state_dir
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        world = load_world(options.world)
        demo = demo_application(world, options.demo_app)
        key = SigningKey.load_or_create(state_dir / SIGNING_KEY_NAME)
        ca = ensure_ca(state_dir)
        sans = list(dict.fromkeys([*DEFAULT_SANS, *options.extra_sans]))
        cert, cert_key = ca.issue(
            state_dir, SERVICE_NAME, dns_names=sans, ip_addresses=["127.0.0.1"]
        )
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(cert, cert_key)
        served = [*sans, "127.0.0.1", *LOGIN_HOSTS]
        emulator = build(world, key, state_dir / CA_CERT_NAME, served, options.snapshot)
        runner = web.AppRunner(emulator.app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", options.port, ssl_context=tls)
        await site.start()
    except (OSError, ValueError, WorldError) as exc:
        print(f"error: entra emulator: {exc}", file=sys.stderr, flush=True)
        return 2

    port = int(runner.addresses[0][1])
    url = f"https://localhost:{port}"
    info_path = state_dir / f"{SERVICE_NAME}.json"
    env = client_env(world, url, demo)
    _write_json(
        info_path,
        {"name": SERVICE_NAME, "pid": os.getpid(), "url": url, "port": port, "env": env},
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"READY url={url}", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        info_path.unlink(missing_ok=True)
    return 0


def serve(options: ServeOptions) -> int:
    return asyncio.run(_serve(options))
