"""The test-control endpoint: plain JSON over HTTP on loopback (no TLS, no auth: loopback only).

Routes (the ``ctl`` CLI wraps them; the base URL is ``admin_url`` in ``DIR/azuresql.json``):

* ``GET  /servers``: every server with port, running state, pending faults and database users;
* ``POST /servers/{name}/fail-logins`` ``{"count": N, "error": 40613}``: the next N logins to
  that server fail with the given transient error (40613, 40501, 40197, 49918 or 4060);
* ``POST /servers/{name}/reset-connections`` ``{"logins": N, "results": M}``: the next N logins
  are reset (TCP RST) right after LOGIN7 arrives, and the next M replies to a batch or RPC are cut
  off halfway and the connection reset, as a failing gateway or network does;
* ``POST /servers/{name}/stop`` and ``/start``: drop the listener and every connection, or listen
  again on the same port (so ``AZ_SERVER`` stays valid);
* ``GET  /log?server=NAME&since=TS`` and ``DELETE /log``: the query log (logins, batches, RPCs,
  transaction requests and attentions, with the SQL error number when one was sent).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from sandbox.azuresql.server import TRANSIENT_LOGIN_ERRORS, EmulatedServer


def server_status(server: EmulatedServer) -> dict[str, Any]:
    return {
        "name": server.name,
        "port": server.port,
        "running": server.running,
        "tenant": server.spec.tenant,
        "fail_logins": server.faults.fail_logins,
        "fail_error": server.faults.error,
        "reset_logins": server.faults.reset_logins,
        "reset_results": server.faults.reset_results,
        "databases": {
            db.name: [{"name": n, "type": t, "roles": r} for n, t, r in db.principals()]
            for db in server.databases.values()
        },
    }


def build_app(servers: dict[str, EmulatedServer]) -> web.Application:
    def find(request: web.Request) -> EmulatedServer:
        name = request.match_info["name"]
        if name not in servers:
            raise web.HTTPNotFound(text=f"no server named {name!r}; known: {sorted(servers)}")
        return servers[name]

    async def list_servers(_request: web.Request) -> web.Response:
        return web.json_response([server_status(s) for s in servers.values()])

    async def fail_logins(request: web.Request) -> web.Response:
        server = find(request)
        body = await request.json() if request.can_read_body else {}
        count, error = int(body.get("count", 1)), int(body.get("error", 40613))
        if error not in TRANSIENT_LOGIN_ERRORS or count < 0:
            raise web.HTTPBadRequest(
                text=f"error must be one of {sorted(TRANSIENT_LOGIN_ERRORS)}, count >= 0"
            )
        server.faults.fail_logins, server.faults.error = count, error
        return web.json_response(server_status(server))

    async def reset_connections(request: web.Request) -> web.Response:
        server = find(request)
        body = await request.json() if request.can_read_body else {}
        logins, results = int(body.get("logins", 0)), int(body.get("results", 0))
        if logins < 0 or results < 0:
            raise web.HTTPBadRequest(text="logins and results must be >= 0")
        server.faults.reset_logins, server.faults.reset_results = logins, results
        return web.json_response(server_status(server))

    async def stop(request: web.Request) -> web.Response:
        server = find(request)
        await server.stop()
        return web.json_response(server_status(server))

    async def start(request: web.Request) -> web.Response:
        server = find(request)
        await server.start()
        return web.json_response(server_status(server))

    async def get_log(request: web.Request) -> web.Response:
        name = request.query.get("server")
        since = float(request.query.get("since", "0"))
        entries = [
            e.as_dict()
            for s in servers.values()
            if name in (None, s.name)
            for e in s.log
            if e.ts > since
        ]
        entries.sort(key=lambda e: e["ts"])
        return web.json_response(entries)

    async def clear_log(_request: web.Request) -> web.Response:
        for server in servers.values():
            server.log.clear()
        return web.json_response({"cleared": True})

    app = web.Application()
    app.router.add_get("/servers", list_servers)
    app.router.add_post("/servers/{name}/fail-logins", fail_logins)
    app.router.add_post("/servers/{name}/reset-connections", reset_connections)
    app.router.add_post("/servers/{name}/stop", stop)
    app.router.add_post("/servers/{name}/start", start)
    app.router.add_get("/log", get_log)
    app.router.add_delete("/log", clear_log)
    return app
