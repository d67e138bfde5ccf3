"""The admin API under ``/_sandbox/``: test controls, request log, reset.

Unauthenticated by design, and therefore served only to loopback peers that dialled the emulator
as ``localhost`` or ``127.0.0.1`` (routing.Router.surfaces_for); requests that arrive as an Azure
host name (through the proxy) never reach it. Admin calls are not recorded in the request log.

Endpoints (JSON in, JSON out; ``python -m sandbox.entra ctl`` wraps each one):
- ``GET  /_sandbox/health``                      -> ``{"ok": true}``
- ``GET  /_sandbox/controls``                    -> the current controls
- ``POST /_sandbox/controls``   ``{"propagationSeconds", "armWriteSeconds",
  "graphReadLagSeconds", "clockSkewSeconds", "tokenLifetimeSeconds"}`` (any subset)
- ``POST /_sandbox/latency``    ``{"route": "graph.*", "seconds": 0.2, "jitter": 0.3}``: a fixed
  delay plus a uniform draw from ``[0, jitter]`` per call (0 removes; the log's ``delay_ms``
  says what each call waited)
- ``POST /_sandbox/failures``   ``{"route": "login.token", "status": 429, "count": 2,
  "retryAfter": 1}`` -> the next ``count`` matching calls get ``status``
- ``POST /_sandbox/ratelimits`` ``{"route": "arm.fic.put", "rate": 0.25, "burst": 1,
  "perTarget": true}`` -> calls over the token bucket get 429 with ``Retry-After`` (rate 0 removes)
- ``GET  /_sandbox/requests[?route=PATTERN]``    -> ``{"counts": {...}, "log": [...]}``
- ``DELETE /_sandbox/requests``                  -> clears the log and counts
- ``GET  /_sandbox/state``                       -> federated credentials per principal
- ``POST /_sandbox/reset``      ``{"state": true}`` -> controls and log cleared; with ``state``
  (the default) the directory goes back to the world seed
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

from aiohttp import web

from sandbox.entra.faults import Controls
from sandbox.entra.oidc import IssuerKeys
from sandbox.entra.routing import Handler, PathParams, Router, Surface
from sandbox.entra.state import Directory


class AdminError(Exception):
    pass


def render_error(request: web.Request, status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def _number(body: dict[str, Any], key: str, default: float | None = None) -> float:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AdminError(f"'{key}' must be a number")
    return float(value)


class AdminService:
    def __init__(self, directory: Directory, controls: Controls, issuer_keys: IssuerKeys) -> None:
        self.directory = directory
        self.controls = controls
        self.issuer_keys = issuer_keys

    def register(self, router: Router) -> None:
        a = Surface.ADMIN
        for method, path, name, handler in [
            ("GET", "health", "health", self.health),
            ("GET", "controls", "controls", self.get_controls),
            ("POST", "controls", "controls", self.set_controls),
            ("POST", "latency", "latency", self.latency),
            ("POST", "failures", "failures", self.failures),
            ("POST", "ratelimits", "ratelimits", self.rate_limits),
            ("GET", "requests", "requests", self.requests),
            ("DELETE", "requests", "requests", self.clear_requests),
            ("GET", "state", "state", self.state),
            ("POST", "reset", "reset", self.reset),
        ]:
            router.add(a, method, rf"/_sandbox/{path}", f"admin.{name}", self._wrap(handler))

    @staticmethod
    def _wrap(handler: Callable[[web.Request, dict[str, Any]], Awaitable[Any]]) -> Handler:
        async def run(request: web.Request, _: PathParams) -> web.StreamResponse:
            try:
                body: dict[str, Any] = {}
                if request.can_read_body:
                    loaded = json.loads(await request.text() or "{}")
                    if not isinstance(loaded, dict):
                        raise AdminError("the body must be a JSON object")
                    body = loaded
                result: Any = await handler(request, body)
                return web.json_response(result)
            except (AdminError, ValueError) as exc:
                return render_error(request, 400, "BadRequest", str(exc))

        return run

    async def health(self, request: web.Request, body: dict[str, Any]) -> Any:
        return {"ok": True}

    async def get_controls(self, request: web.Request, body: dict[str, Any]) -> Any:
        return self.controls.to_json()

    async def set_controls(self, request: web.Request, body: dict[str, Any]) -> Any:
        settings = self.controls.settings
        if "propagationSeconds" in body:
            settings.propagation_seconds = _number(body, "propagationSeconds")
        if "armWriteSeconds" in body:
            settings.arm_write_seconds = _number(body, "armWriteSeconds")
        if "graphReadLagSeconds" in body:
            settings.graph_read_lag_seconds = max(0.0, _number(body, "graphReadLagSeconds"))
        if "clockSkewSeconds" in body:
            self.controls.clock.skew = _number(body, "clockSkewSeconds")
        if "tokenLifetimeSeconds" in body:
            lifetime = int(_number(body, "tokenLifetimeSeconds"))
            if lifetime < 1:
                raise AdminError("'tokenLifetimeSeconds' must be at least 1")
            settings.token_lifetime_seconds = lifetime
        return self.controls.to_json()

    async def latency(self, request: web.Request, body: dict[str, Any]) -> Any:
        route = body.get("route")
        if not isinstance(route, str) or not route:
            raise AdminError("'route' is required")
        self.controls.set_latency(
            route,
            _number(body, "seconds", 0),
            _number(body, "jitter", 0) if "jitter" in body else 0,
        )
        return self.controls.to_json()

    async def failures(self, request: web.Request, body: dict[str, Any]) -> Any:
        route = body.get("route")
        if not isinstance(route, str) or not route:
            raise AdminError("'route' is required")
        status = int(_number(body, "status", 429))
        if not 400 <= status <= 599:
            raise AdminError("'status' must be an HTTP error status")
        count = int(_number(body, "count", 1))
        retry_after = body.get("retryAfter")
        self.controls.fail_next(
            route, status, count, None if retry_after is None else _number(body, "retryAfter")
        )
        return self.controls.to_json()

    async def rate_limits(self, request: web.Request, body: dict[str, Any]) -> Any:
        route = body.get("route")
        if not isinstance(route, str) or not route:
            raise AdminError("'route' is required")
        rate = _number(body, "rate")
        self.controls.set_rate_limit(
            route, rate, _number(body, "burst", 1), bool(body.get("perTarget", True))
        )
        return self.controls.to_json()

    async def requests(self, request: web.Request, body: dict[str, Any]) -> Any:
        pattern = request.query.get("route", "*")
        log = [asdict(r) for r in self.controls.log if fnmatch.fnmatchcase(r.route, pattern)]
        counts = {
            k: v for k, v in sorted(self.controls.counts.items()) if fnmatch.fnmatchcase(k, pattern)
        }
        return {"counts": counts, "total": sum(counts.values()), "log": log}

    async def clear_requests(self, request: web.Request, body: dict[str, Any]) -> Any:
        self.controls.clear_log()
        return {"ok": True}

    async def state(self, request: web.Request, body: dict[str, Any]) -> Any:
        return {
            "principals": [
                {
                    "name": p.name,
                    "kind": p.kind,
                    "clientId": p.client_id,
                    "credentials": [c.to_json() for c in p.credentials.values()],
                }
                for p in self.directory.principals()
            ]
        }

    async def reset(self, request: web.Request, body: dict[str, Any]) -> Any:
        self.controls.reset()
        self.issuer_keys.forget()
        if body.get("state", True):
            self.directory.reset()
        return {"ok": True}
