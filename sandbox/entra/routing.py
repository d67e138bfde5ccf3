"""One dispatcher for every request: host -> surface -> named route -> test controls -> handler.

Azure splits its HTTP surfaces by host: the token service on ``login.microsoftonline.com`` (and
its aliases), Microsoft Graph on ``graph.microsoft.com``, ARM on ``management.azure.com``. Reached
through the sandbox's CONNECT proxy the emulator sees those names in the Host header and serves only
the matching surface, exactly like the real split. Reached directly (``localhost``/``127.0.0.1``) it
serves all of them on one port (their paths do not overlap) plus the admin API, which is only
served to loopback peers that dialled a loopback name.

Paths are normalised before matching (msgraph-sdk sends ``/v1.0//applications``). A route's name
is what latency, injected failures and the request log are keyed by. Errors each surface renders in
its own shape (Entra's OAuth error, Graph's OData error, ARM's error envelope), so an injected 429
looks to the SDK like the real service's.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from aiohttp import web

from sandbox.entra.faults import Controls, RequestRecord

log = logging.getLogger(__name__)


class Surface(enum.Enum):
    LOGIN = "login"
    GRAPH = "graph"
    ARM = "arm"
    ADMIN = "admin"


LOGIN_HOSTS = frozenset(
    {"login.microsoftonline.com", "login.windows.net", "login.microsoft.com", "sts.windows.net"}
)
PUBLIC_HOSTS: Mapping[str, Surface] = {
    **{h: Surface.LOGIN for h in LOGIN_HOSTS},
    "graph.microsoft.com": Surface.GRAPH,
    "management.azure.com": Surface.ARM,
}
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})

PathParams = dict[str, str]
Handler = Callable[[web.Request, PathParams], Awaitable[web.StreamResponse]]
# (request, status, code, message) -> response in the surface's error shape
ErrorRenderer = Callable[[web.Request, int, str, str], web.Response]


@dataclass(frozen=True)
class Route:
    name: str
    surface: Surface
    method: str
    pattern: re.Pattern[str]
    handler: Handler


def hostname(request: web.Request) -> str:
    """The Host header without its port, lower-cased."""
    host = (request.host or "").lower()
    if host.startswith("["):
        return host.split("]")[0] + "]"
    return host.rsplit(":", 1)[0] if ":" in host else host


def base_url(request: web.Request) -> str:
    """The emulator's URL as the client sees it (``https://`` + Host header)."""
    return f"https://{request.host}"


def _is_loopback_peer(request: web.Request) -> bool:
    try:
        return ipaddress.ip_address(request.remote or "").is_loopback
    except ValueError:
        return False


class Router:
    def __init__(self, controls: Controls, renderers: Mapping[Surface, ErrorRenderer]) -> None:
        self.controls = controls
        self.renderers = renderers
        self.routes: list[Route] = []

    def add(self, surface: Surface, method: str, pattern: str, name: str, handler: Handler) -> None:
        """``pattern`` is a regex over the normalised path; literal segments match any case."""
        compiled = re.compile(pattern, re.IGNORECASE)
        self.routes.append(Route(name, surface, method.upper(), compiled, handler))

    def surfaces_for(self, request: web.Request) -> set[Surface]:
        host = hostname(request)
        public = PUBLIC_HOSTS.get(host)
        if public is not None:
            return {public}
        allowed = {Surface.LOGIN, Surface.GRAPH, Surface.ARM}
        if host in LOOPBACK_NAMES and _is_loopback_peer(request):
            allowed.add(Surface.ADMIN)
        return allowed

    def _render(
        self, surface: Surface | None, request: web.Request, status: int, code: str, message: str
    ) -> web.Response:
        if surface is None:
            return web.json_response({"error": {"code": code, "message": message}}, status=status)
        return self.renderers[surface](request, status, code, message)

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        path = re.sub(r"/{2,}", "/", request.path)
        allowed = self.surfaces_for(request)
        route, params, method_mismatch = None, None, False
        for candidate in self.routes:
            if candidate.surface not in allowed:
                continue
            matched = candidate.pattern.fullmatch(path)
            if matched is None:
                continue
            if candidate.method != request.method:
                method_mismatch = True
                continue
            route, params = candidate, matched.groupdict()
            break
        injected, delay = False, 0.0
        if route is None or params is None:
            name = "unmatched"
            surface = next(iter(allowed)) if len(allowed) == 1 else None
            status, code = (405, "MethodNotAllowed") if method_mismatch else (404, "NotFound")
            response: web.StreamResponse = self._render(
                surface, request, status, code, f"No route for {request.method} {path}."
            )
        else:
            name = route.name
            response, injected, delay = await self._run(route, request, params)
        if route is None or route.surface is not Surface.ADMIN:
            self.controls.record(
                RequestRecord(
                    at=time.time(),
                    route=name,
                    method=request.method,
                    path=path,
                    status=response.status,
                    ms=round((time.perf_counter() - started) * 1000, 3),
                    injected=injected,
                    delay_ms=round(delay * 1000, 3),
                )
            )
        return response

    async def _run(
        self, route: Route, request: web.Request, params: PathParams
    ) -> tuple[web.StreamResponse, bool, float]:
        delay = 0.0
        if route.surface is not Surface.ADMIN:
            target = params.get("name") or params.get("oid") or params.get("appid") or ""
            delay, failure = self.controls.before(route.name, target)
            if delay > 0:
                await asyncio.sleep(delay)
            if failure is not None:
                code = "TooManyRequests" if failure.status == 429 else "ServiceUnavailable"
                response = self._render(
                    route.surface,
                    request,
                    failure.status,
                    code,
                    f"Injected by the sandbox: {failure.status} for route {route.name}.",
                )
                if failure.retry_after is not None:
                    # HTTP allows whole seconds only (kiota ignores anything else).
                    response.headers["Retry-After"] = str(math.ceil(failure.retry_after))
                return response, True, delay
        try:
            return await route.handler(request, params), False, delay
        except web.HTTPException:
            raise
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            return (
                self._render(
                    route.surface, request, 500, "InternalServerError", "The emulator failed."
                ),
                False,
                delay,
            )
