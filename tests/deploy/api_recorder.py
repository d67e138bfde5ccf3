"""A recording reverse proxy in front of the sandbox's API server, and RBAC arithmetic over what it
recorded: which (verb, group, resource) each request needed, and which rules of a role were used.

The operator under test gets a kubeconfig whose server is this proxy (plain HTTP on loopback) and
whose user is a TokenRequest token of the deployed ServiceAccount: the API server authenticates
and authorises every request exactly as for the operator's pod; the proxy only forwards, streams
(watches included) and writes down method, path, query and status.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    query: str
    status: int
    refusal: str = ""  # the API server's message, for a 403

    @property
    def refused_by_rbac(self) -> bool:
        """A 403 from authorisation (not, say, a namespace being deleted)."""
        return self.status == 403 and " cannot " in self.refusal


@dataclass(frozen=True)
class Access:
    """What RBAC checks for one request: a resource request or a non-resource URL."""

    verb: str
    group: str = ""
    resource: str = ""  # with its subresource: "sqlworkloadidentities/status"
    name: str = ""
    namespace: str = ""
    url: str = ""  # non-resource requests only


def access_of(record: Recorded) -> Access | None:
    """The RBAC attributes of a request; None for discovery, which every identity may read."""
    parts = [p for p in record.path.split("/") if p]
    query = parse_qs(record.query)
    if not parts or parts[0] not in ("api", "apis"):
        if parts and parts[0] in ("version", "openapi"):
            return None
        return Access(verb=record.method.lower(), url=record.path)
    if parts[0] == "api":
        group, rest = "", parts[2:]
    else:
        if len(parts) <= 3:
            return None  # /apis, /apis/<group>, /apis/<group>/<version>
        group, rest = parts[1], parts[3:]
    if not rest:
        return None  # /api/v1
    namespace = ""
    if rest[0] == "namespaces" and len(rest) >= 3:
        namespace, rest = rest[1], rest[2:]
    resource = rest[0]
    name = rest[1] if len(rest) > 1 else ""
    if len(rest) > 2:
        resource = f"{resource}/{rest[2]}"
    method = record.method.upper()
    if method == "GET":
        watching = query.get("watch", ["false"])[0] in ("true", "1")
        verb = "get" if name else ("watch" if watching else "list")
    else:
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}[method]
        if verb == "delete" and not name:
            verb = "deletecollection"
    return Access(verb, group, resource, name, namespace)


@dataclass(frozen=True)
class Grant:
    """One (group, resource, verb) or (url, verb) of a role, with its resourceNames if any."""

    verb: str
    group: str = ""
    resource: str = ""
    names: tuple[str, ...] = ()
    url: str = ""
    namespace: str = ""  # a Role's namespace; "" for a ClusterRole

    def covers(self, access: Access) -> bool:
        if self.url or access.url:
            return self.url == access.url and self.verb == access.verb
        return (
            (self.group, self.resource, self.verb) == (access.group, access.resource, access.verb)
            and (not self.names or access.name in self.names)
            and (not self.namespace or self.namespace == access.namespace)
        )

    def __str__(self) -> str:
        if self.url:
            return f"{self.verb} {self.url}"
        where = f" in {self.namespace}" if self.namespace else ""
        names = f" {list(self.names)}" if self.names else ""
        return f"{self.verb} {self.group or 'core'}/{self.resource}{names}{where}"


def grants_of(role: dict[str, Any]) -> list[Grant]:
    namespace = role["metadata"].get("namespace", "") if role["kind"] == "Role" else ""
    found = []
    for rule in role.get("rules") or []:
        for verb in rule["verbs"]:
            for url in rule.get("nonResourceURLs") or []:
                found.append(Grant(verb, url=url))
            for group in rule.get("apiGroups") or []:
                for resource in rule.get("resources") or []:
                    names = tuple(rule.get("resourceNames") or ())
                    found.append(Grant(verb, group, resource, names, namespace=namespace))
    return found


def unused(grants: Iterable[Grant], accesses: Iterable[Access]) -> list[Grant]:
    seen = list(accesses)
    return [g for g in grants if not any(g.covers(a) for a in seen)]


class _Replay:
    """A response body already read, streamed again."""

    def __init__(self, body: bytes) -> None:
        self._body = body

    async def iter_any(self) -> Any:
        yield self._body


class ApiRecorder:
    """``with ApiRecorder(upstream, ca) as url:`` a proxy at ``url`` recording into ``records``."""

    def __init__(self, upstream: str, ca_file: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.ca_file = ca_file
        self.records: list[Recorded] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: Any = None
        self._session: Any = None

    async def _handle(self, request: Any) -> Any:
        from aiohttp import web

        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        body = await request.read()
        async with self._session.request(
            request.method,
            f"{self.upstream}{request.path_qs}",
            headers=headers,
            data=body or None,
        ) as upstream:
            refusal = ""
            if upstream.status == 403:
                body = await upstream.read()
                refusal = body.decode(errors="replace")[:500]
                upstream.content = _Replay(body)
            self.records.append(
                Recorded(
                    request.method, request.path, request.query_string, upstream.status, refusal
                )
            )
            response = web.StreamResponse(
                status=upstream.status,
                headers={k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP},
            )
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    async def _start(self) -> str:
        import aiohttp
        from aiohttp import web

        context = ssl.create_default_context(cafile=self.ca_file)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=context),
            timeout=aiohttp.ClientTimeout(total=None),
            auto_decompress=False,
            # Forward exactly what came in: the Kubernetes client sends JSON bodies without a
            # Content-Type, which the API server accepts and aiohttp would label octet-stream.
            skip_auto_headers=("Content-Type", "User-Agent"),
        )
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"http://127.0.0.1:{port}"

    async def _stop(self) -> None:
        await self._runner.cleanup()
        await self._session.close()

    def __enter__(self) -> str:
        self._thread.start()
        return asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)

    def __exit__(self, *_: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
