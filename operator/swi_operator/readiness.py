"""The readiness probe (``--readiness``, e.g. ``http://0.0.0.0:8081/readyz``): 200 once this
replica can answer admission requests, 503 naming what is missing before that.

Ready means: the operator's start-up is done (the policy webhook decides with its clients), and,
when it serves webhooks, kopf's webhook server has started, the webhook configurations have been
brought in line with it (its CA bundle), its port completes a TLS handshake right now, and the
caches its webhooks registered (``wait_for``) have synced: the pod injection webhook's service
account cache (``service_account_cache``) has made its first list. Only that first sync counts: a
watch that breaks later sends admissions to the API server instead, and does not make the replica
unready. The policy webhook reads through the API server (policies with a two-second cache). A
standby replica is ready as soon as the active one would be: both serve the webhooks (peers.py);
only reconciling is the active one's.

Liveness is another question, answered by kopf's own endpoint (``--liveness``): its event loop
answers. A replica whose webhook port stops answering leaves the Service's endpoints (readiness)
instead of being restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

PROBE_TIMEOUT_S = 2.0


@dataclass
class Readiness:
    webhooks: bool  # this replica serves admission webhooks
    started: bool = False  # the operator's start-up handler has finished
    webhook_address: tuple[str, int] | None = None  # set once the webhook server listens
    # What must be true before this replica is ready, and what to say while it is not.
    waits: list[tuple[str, Callable[[], bool]]] = field(default_factory=list)

    def wait_for(self, problem: str, done: Callable[[], bool]) -> None:
        """Not ready, saying ``problem``, until ``done()`` (e.g. a cache's first sync)."""
        self.waits.append((problem, done))

    def listening(self, addr: str | None, url: str) -> None:
        """kopf's webhook server listens on ``addr`` (None or a wildcard: every interface) at
        the port of ``url`` (the client config it reported), and the configurations point at it."""
        port = urlsplit(url).port
        if port is None:
            raise ValueError(f"the webhook URL {url!r} names no port")
        host = "127.0.0.1" if addr in (None, "", "0.0.0.0", "::") else str(addr)
        self.webhook_address = (host, port)

    async def problems(self) -> list[str]:
        found = []
        if not self.started:
            found.append("the operator is starting")
        if self.webhooks:
            if self.webhook_address is None:
                found.append("the webhook server has not started")
            elif not await tls_answers(*self.webhook_address):
                host, port = self.webhook_address
                found.append(f"the webhook port {host}:{port} does not answer")
        found += [problem for problem, done in self.waits if not done()]
        return found


def of(memo: MutableMapping[str, Any], webhooks: bool | None = None) -> Readiness:
    """The operator's one Readiness, kept in kopf's memo: made by whichever start-up handler runs
    first (kopf runs them in the order their modules were imported, which is nobody's contract),
    ``webhooks`` set by the one that knows the configuration."""
    ready = memo.get("readiness")
    if not isinstance(ready, Readiness):
        ready = Readiness(webhooks=bool(webhooks))
        memo["readiness"] = ready
    elif webhooks is not None:
        ready.webhooks = webhooks
    return ready


async def tls_answers(host: str, port: int) -> bool:
    """Whether a TLS server answers a handshake at host:port (whose certificate it is is not
    the question here: it is this process's own server)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_S):
            _, writer = await asyncio.open_connection(host, port, ssl=context)
    except (OSError, TimeoutError, ssl.SSLError):
        return False
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError):
        await writer.wait_closed()
    return True


async def serve(endpoint: str, readiness: Readiness) -> None:
    """Answer ``GET <path>`` at ``endpoint`` (an http:// URL) until cancelled."""
    parts = urlsplit(endpoint)

    async def ready(_: web.Request) -> web.Response:
        problems = await readiness.problems()
        if problems:
            return web.Response(status=503, text="not ready: " + "; ".join(problems) + "\n")
        return web.Response(text="ready\n")

    app = web.Application()
    app.add_routes([web.get(parts.path or "/", ready)])
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, parts.hostname, parts.port or 80).start()
    try:
        await asyncio.Event().wait()
    finally:
        await asyncio.shield(runner.cleanup())
