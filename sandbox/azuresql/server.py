"""The emulated Azure SQL servers: one asyncio listener per server, one TDS session per connection.

A session runs the phases a real Azure SQL gateway does:

1. **Sniff**: a first byte of 0x16 is a TLS ClientHello (TDS 8.0, ``Encrypt=strict``): TLS first,
   with ALPN ``tds/8.0``. Anything else must be a PRELOGIN packet (TDS 7.x).
2. **PRELOGIN**: answer VERSION, ENCRYPTION=ON, INSTOPT, MARS=off and FEDAUTHREQUIRED when asked.
   On TDS 7.x the TLS handshake then runs inside PRELOGIN packets (``tls.py``).
3. **LOGIN7**: injected faults first (``ctl fail-logins``: 40613 and friends), then only FEDAUTH
   access tokens are accepted (SQL logins are refused as on an Entra-only server); the token is
   verified (``login.py``) and mapped to the Entra admin or a contained user (``engine.py``).
4. **Requests** until the client hangs up: SQL_BATCH, RPC (``sp_prepexec``/``sp_execute``/
   ``sp_executesql``/``sp_prepare``/``sp_unprepare``; other procedures get 2812, which the driver
   tolerates for ``sp_datatype_info_100``), transaction-manager requests, and ATTENTION, which
   interrupts the running statement and is answered with DONE(ATTN). Engine work runs in a thread
   while the session keeps reading, so an ATTENTION is seen while a statement is still running.

Each server also keeps a bounded query log and its fault settings, both driven by ``admin.py``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandbox.azuresql import tds
from sandbox.azuresql.config import ServerSpec
from sandbox.azuresql.directory import GraphDirectory
from sandbox.azuresql.engine import Database, DbUser, Session
from sandbox.azuresql.login import LOGIN_FAILED, SQL_SPN, LoginRefused, TokenVerifier
from sandbox.azuresql.results import Cancelled, Event, SqlError, StatementDone, TransactionEvent
from sandbox.azuresql.statements import bind, declared_names
from sandbox.azuresql.tls import TLS_RECORD_HANDSHAKE, ByteStream, PlainStream, TlsStream

log = logging.getLogger("sandbox.azuresql")

LOG_LIMIT = 2000
# The STS Azure SQL names in FEDAUTHINFO (the sandbox's proxy tunnels this host to the emulator).
STS_HOST = "https://login.windows.net"
SERVER_VERSION = bytes([12, 0, 0x07, 0xD0, 0, 0])  # 12.0.2000, as Azure SQL reports
# Errors the fault injector may send at login, with Azure SQL's texts (%s: database, server).
TRANSIENT_LOGIN_ERRORS = {
    40613: (
        17,
        "Database '{db}' on server '{server}' is not currently available. Please retry "
        "the connection later. If the problem persists, contact customer support, and "
        "provide them the session tracing ID of '{trace}'.",
    ),
    40501: (
        20,
        "The service is currently busy. Retry the request after 10 seconds. Incident ID: "
        "{trace}. Code: 4145.",
    ),
    40197: (
        20,
        "The service has encountered an error processing your request. Please try again. "
        "Error code 4815.",
    ),
    49918: (
        16,
        "Cannot process request. Not enough resources to process request. The service is "
        "currently busy. Please retry the request later.",
    ),
    4060: (11, 'Cannot open database "{db}" requested by the login. The login failed.'),
}
_PROC_NAMES = {
    "sp_executesql": tds.ProcId.SP_EXECUTESQL,
    "sp_prepare": tds.ProcId.SP_PREPARE,
    "sp_execute": tds.ProcId.SP_EXECUTE,
    "sp_prepexec": tds.ProcId.SP_PREPEXEC,
    "sp_unprepare": tds.ProcId.SP_UNPREPARE,
}


@dataclass
class LogEntry:
    ts: float
    server: str
    database: str
    user: str
    kind: str  # login | batch | rpc | tm | attention
    text: str
    error: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Faults:
    fail_logins: int = 0
    error: int = 40613
    # The next N logins: the connection is reset (TCP RST) right after LOGIN7 arrives.
    reset_logins: int = 0
    # The next N replies to a batch or RPC: half of the reply is sent, then the connection reset.
    reset_results: int = 0


@dataclass
class EmulatedServer:
    """One logical server (``<name>.database.windows.net``) on its own loopback port, and at
    ``node_address`` (the host's end of the sandbox node's link) when given, for pods: on
    ``node_port`` (1433, Azure SQL's, for the first server: that address is the sandbox's own, so
    pods and manifests use Azure's port), else on the loopback port."""

    spec: ServerSpec
    databases: dict[str, Database]
    verifier: TokenVerifier
    contexts: tuple[ssl.SSLContext, ssl.SSLContext]
    port: int = 0
    node_address: str | None = None
    node_port: int | None = None
    faults: Faults = field(default_factory=Faults)
    log: collections.deque[LogEntry] = field(
        default_factory=lambda: collections.deque(maxlen=LOG_LIMIT)
    )
    _listener: asyncio.Server | None = None
    _node_listener: asyncio.Server | None = None
    _sessions: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pod_port(self) -> int:
        """The port pods dial (on the node address)."""
        return self.node_port or self.port

    @property
    def running(self) -> bool:
        return self._listener is not None

    def record(self, **fields: Any) -> None:
        self.log.append(LogEntry(ts=time.time(), server=self.name, **fields))

    async def start(self) -> None:
        if self._listener is not None:
            return
        listener = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        port = listener.sockets[0].getsockname()[1]
        if self.node_address is not None:
            try:
                self._node_listener = await asyncio.start_server(
                    self._accept, self.node_address, self.node_port or port
                )
            except OSError:
                listener.close()
                await listener.wait_closed()
                raise
        self._listener, self.port = listener, port

    async def stop(self) -> None:
        """Close the listener and drop every connection, as an unreachable server would."""
        listener, self._listener = self._listener, None
        node_listener, self._node_listener = self._node_listener, None
        for each in (listener, node_listener):
            if each is not None:
                each.close()
        for task in list(self._sessions):
            task.cancel()
        if self._sessions:
            await asyncio.gather(*self._sessions, return_exceptions=True)
        for each in (listener, node_listener):
            if each is not None:
                await each.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._sessions.add(task)
        try:
            await TdsSession(self, PlainStream(reader, writer), writer.transport.abort).run()
        except asyncio.CancelledError:
            pass
        finally:
            self._sessions.discard(task)
            writer.close()


class _Closed(Exception):
    """The client went away."""


class TdsSession:
    def __init__(self, server: EmulatedServer, raw: PlainStream, reset: Callable[[], None]) -> None:
        self.server = server
        self.raw = raw
        self._reset = reset  # abort the TCP connection (RST), for the injected resets
        self.stream: ByteStream = raw
        self.packet_size = tds.MAX_PRELOGIN_PACKET
        self.session: Session | None = None
        self.database = ""
        self.fedauth_required = False  # what our PRELOGIN reply said; LOGIN7 must echo it
        self._queued: tuple[int, bytes] | None = None

    # -- framing

    async def read_message(self) -> tuple[int, bytes]:
        if self._queued is not None:
            queued, self._queued = self._queued, None
            return queued
        payload = bytearray()
        while True:
            try:
                header = await self.stream.read_exactly(tds.HEADER_SIZE)
                ptype, status, length = tds.parse_header(header)
                payload += await self.stream.read_exactly(length)
            except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError) as exc:
                raise _Closed from exc
            if status & tds.STATUS_EOM:
                return ptype, bytes(payload)

    async def send(self, payload: bytes) -> None:
        await self.stream.write(tds.packetize(tds.PacketType.RESPONSE, payload, self.packet_size))

    def _error(self, number: int, message: str, severity: int = 16, state: int = 1) -> bytes:
        return tds.message(tds.Token.ERROR, number, state, severity, message, self.server.name)

    # -- phases

    async def run(self) -> None:
        try:
            if await self.raw.peek_byte() == TLS_RECORD_HANDSHAKE:
                strict = TlsStream(self.server.contexts[1], self.raw)
                await strict.handshake_direct()
                self.stream = strict
                await self._prelogin(strict=True)
            else:
                await self._prelogin(strict=False)
            if await self._login():
                await self._serve()
        except (_Closed, asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        except tds.ProtocolError as exc:
            log.warning("%s: protocol error: %s", self.server.name, exc)
        finally:
            if self.session is not None:
                self.session.close()
            await self.stream.close()

    async def _prelogin(self, *, strict: bool) -> None:
        ptype, payload = await self.read_message()
        if ptype != tds.PacketType.PRELOGIN:
            raise tds.ProtocolError(f"expected PRELOGIN, got packet type 0x{ptype:02x}")
        options = tds.parse_prelogin(payload)
        client = options.get(tds.PreloginOption.ENCRYPTION, b"\x00")[:1] or b"\x00"
        # Azure SQL always encrypts; a client that cannot gets ENCRYPT_REQ and gives up.
        reply = (
            tds.Encryption.REQ
            if client[0] == tds.Encryption.NOT_SUP and not strict
            else tds.Encryption.ON
        )
        self.fedauth_required = tds.PreloginOption.FEDAUTHREQUIRED in options
        reply_options: list[tuple[int, bytes]] = [
            (tds.PreloginOption.VERSION, SERVER_VERSION),
            (tds.PreloginOption.ENCRYPTION, bytes([reply])),
            (tds.PreloginOption.INSTOPT, b"\x00"),
            (tds.PreloginOption.THREADID, b""),
            (tds.PreloginOption.MARS, b"\x00"),
        ]
        if self.fedauth_required:
            reply_options.append((tds.PreloginOption.FEDAUTHREQUIRED, b"\x01"))
        await self.send(tds.build_prelogin(reply_options))
        if not strict and reply == tds.Encryption.ON:
            tls = TlsStream(self.server.contexts[0], self.raw)
            await tls.handshake_in_prelogin()
            self.stream = tls

    async def _refuse(
        self, number: int, message: str, *, severity: int = 14, state: int = 1, extra: bytes = b""
    ) -> bool:
        await self.send(
            extra + self._error(number, message, severity, state) + tds.done(tds.DONE_ERROR)
        )
        self.server.record(
            database=self.database, user="", kind="login", text=message, error=number
        )
        return False

    async def _acquire_token(self) -> str:
        """The MSAL/ADAL workflow: send FEDAUTHINFO, read the client's FEDAUTH_TOKEN message.

        The client library gets a token for the SPN from the STS URL (the server's tenant on
        Entra's v1 endpoint: the driver posts to ``{STSURL}/oauth2/token`` with ``resource=SPN``)
        while the server waits, as Azure SQL does.
        """
        sts_url = f"{STS_HOST}/{self.server.spec.tenant}"
        await self.send(tds.fedauth_info(sts_url, SQL_SPN))
        ptype, payload = await self.read_message()
        if ptype != tds.PacketType.FEDAUTH_TOKEN:
            raise tds.ProtocolError(f"expected FEDAUTH_TOKEN, got packet type 0x{ptype:02x}")
        return tds.parse_fedauth_token(payload)

    async def _login(self) -> bool:
        ptype, payload = await self.read_message()
        if ptype != tds.PacketType.LOGIN7:
            raise tds.ProtocolError(f"expected LOGIN7, got packet type 0x{ptype:02x}")
        login = tds.parse_login7(payload)
        self.database = login.database or "master"
        faults = self.server.faults
        if faults.reset_logins > 0:
            faults.reset_logins -= 1
            self._record("login", "connection reset during login (injected)", 0)
            self._reset()
            raise _Closed
        if faults.fail_logins > 0:
            faults.fail_logins -= 1
            severity, text = TRANSIENT_LOGIN_ERRORS.get(faults.error, (16, "Injected error."))
            return await self._refuse(
                faults.error,
                text.format(
                    db=self.database, server=self.server.name, trace=str(uuid.uuid4()).upper()
                ),
                severity=severity,
            )
        if login.fedauth_library == tds.FEDAUTH_LIBRARY_ADAL:
            if login.fedauth_echo != self.fedauth_required:
                return await self._refuse(18456, LOGIN_FAILED)
            login.access_token = await self._acquire_token()
        if login.access_token is None:
            who = login.username or ""
            return await self._refuse(
                18456,
                f"Login failed for user '{who}'. Reason: Azure "
                "Active Directory only authentication is enabled. "
                "Please contact your system administrator.",
            )
        if login.fedauth_echo != self.fedauth_required:
            return await self._refuse(18456, LOGIN_FAILED)
        try:
            principal = await asyncio.to_thread(
                self.server.verifier.verify, login.access_token, self.server.spec.tenant
            )
            database = self.server.databases.get(self.database.lower())
            if database is None:
                not_found = self._error(
                    4060,
                    f'Cannot open database "{self.database}" requested '
                    "by the login. The login failed.",
                    11,
                )
                return await self._refuse(18456, LOGIN_FAILED, extra=not_found)
            spec = self.server.spec
            if principal.app_id == spec.admin_app_id or principal.object_id == spec.admin_object_id:
                user = DbUser(1, "dbo", True, principal.login)
            else:
                user = await asyncio.to_thread(database.find_user, principal)
            self.session = await asyncio.to_thread(database.open, user)
        except LoginRefused as refused:
            return await self._refuse(
                refused.number, refused.message, severity=refused.severity, state=refused.state
            )
        size = login.packet_size if 512 <= login.packet_size <= 32767 else 4096
        self.packet_size = size
        reply = b"".join(
            [
                tds.env_change_text(tds.EnvChange.DATABASE, database.name, "master"),
                tds.message(
                    tds.Token.INFO,
                    5701,
                    2,
                    0,
                    f"Changed database context to '{database.name}'.",
                    self.server.name,
                ),
                tds.env_change_bytes(tds.EnvChange.COLLATION, tds.COLLATION, b""),
                tds.env_change_text(tds.EnvChange.LANGUAGE, "us_english", ""),
                tds.message(
                    tds.Token.INFO,
                    5703,
                    1,
                    0,
                    "Changed language setting to us_english.",
                    self.server.name,
                ),
                tds.env_change_text(tds.EnvChange.PACKET_SIZE, str(size), "4096"),
                tds.login_ack(),
                tds.feature_ext_ack_fedauth() if login.fedauth_library is not None else b"",
                tds.done(tds.DONE_FINAL),
            ]
        )
        self.database = database.name
        self.server.record(
            database=database.name,
            user=user.name,
            kind="login",
            text=f"login {user.name} (appid {principal.app_id})",
        )
        await self.send(reply)
        return True

    # -- requests

    async def _serve(self) -> None:
        reader: asyncio.Task[tuple[int, bytes]] | None = None
        try:
            while True:
                if reader is None:
                    reader = asyncio.ensure_future(self.read_message())
                ptype, payload = await reader
                reader = None
                if ptype == tds.PacketType.ATTENTION:
                    self._record("attention", "")
                    await self.send(tds.done(tds.DONE_ATTN))
                    continue
                assert self.session is not None
                self.session.reset_cancel()
                work = asyncio.ensure_future(self._handle(ptype, payload))
                reader = asyncio.ensure_future(self.read_message())
                await asyncio.wait({work, reader}, return_when=asyncio.FIRST_COMPLETED)
                if work.done():
                    await self._reply(ptype, work.result())
                    continue
                try:
                    next_type, next_payload = reader.result()
                except _Closed:
                    self.session.cancel()
                    await asyncio.gather(work, return_exceptions=True)
                    raise
                reader = None
                if next_type == tds.PacketType.ATTENTION:
                    self.session.cancel()
                    self._record("attention", "")
                    try:
                        partial = await work
                    except Cancelled:
                        partial = b""
                    await self.send(partial + tds.done(tds.DONE_ATTN))
                else:  # a pipelined request: answer this one first
                    await self._reply(ptype, await work)
                    self._queued = (next_type, next_payload)
        finally:
            if reader is not None:
                reader.cancel()

    async def _reply(self, ptype: int, payload: bytes) -> None:
        """Send a request's reply, unless an injected reset cuts it off halfway."""
        faults = self.server.faults
        if faults.reset_results > 0 and ptype in (tds.PacketType.SQL_BATCH, tds.PacketType.RPC):
            faults.reset_results -= 1
            packets = tds.packetize(tds.PacketType.RESPONSE, payload, self.packet_size)
            await self.stream.write(packets[: max(len(packets) // 2, 1)])
            self._record("reset", "connection reset mid-result (injected)", 0)
            self._reset()
            raise _Closed
        await self.send(payload)

    def _record(self, kind: str, text: str, error: int | None = None) -> None:
        user = self.session.user.name if self.session else ""
        self.server.record(database=self.database, user=user, kind=kind, text=text, error=error)

    async def _handle(self, ptype: int, payload: bytes) -> bytes:
        session = self.session
        assert session is not None
        if ptype == tds.PacketType.SQL_BATCH:
            text = tds.parse_sql_batch(payload)
            return (await self._run("batch", text, session.execute, text))[0]
        if ptype == tds.PacketType.RPC:
            out = bytearray()
            calls = tds.parse_rpc(payload)
            for index, call in enumerate(calls):
                out += await self._rpc(call, last=index == len(calls) - 1)
            return bytes(out)
        if ptype == tds.PacketType.TRANSACTION_MANAGER:
            return await self._transaction(tds.parse_transaction_request(payload))
        self._record("unknown", f"packet type 0x{ptype:02x}", 0)
        return self._error(0, f"Unsupported request type 0x{ptype:02x}.") + tds.done(tds.DONE_ERROR)

    async def _run(
        self, kind: str, text: str, function: Any, *args: Any, in_proc: bool = False
    ) -> tuple[bytes, bool]:
        """Run engine work in a thread: (rendered tokens, whether it failed)."""
        try:
            try:
                events: list[Event] = await asyncio.to_thread(function, *args)
            except (Cancelled, SqlError):
                raise
            except Exception as exc:
                # An emulator bug must cost one statement, not the client's connection.
                log.exception("%s: engine failure on %r", self.server.name, text)
                raise SqlError(50000, f"The sandbox's SQL engine failed: {exc!r}") from exc
        except SqlError as error:
            self._record(kind, text, error.number)
            return self._render(error.events, in_proc=in_proc) + self._error(
                error.number, error.message, error.severity, error.state
            ) + (b"" if in_proc else tds.done(tds.DONE_ERROR)), True
        self._record(kind, text)
        return self._render(events, in_proc=in_proc, final=not in_proc), False

    def _render(self, events: list[Event], *, in_proc: bool, final: bool = False) -> bytes:
        """Tokens for engine events; the last DONE of a finished batch drops DONE_MORE."""
        token = tds.Token.DONEINPROC if in_proc else tds.Token.DONE
        parts: list[bytes] = []
        last_done: tuple[int, StatementDone] | None = None
        for event in events:
            if isinstance(event, TransactionEvent):
                begin = event.kind == tds.EnvChange.BEGIN_TRAN
                parts.append(
                    tds.env_change_bytes(
                        event.kind,
                        event.descriptor if begin else b"",
                        b"" if begin else event.descriptor,
                    )
                )
                continue
            if event.result is not None:
                parts.append(tds.col_metadata(event.result.columns))
                parts.extend(tds.row(event.result.columns, r) for r in event.result.rows)
            status = tds.DONE_MORE | (tds.DONE_COUNT if event.rowcount is not None else 0)
            parts.append(tds.done(status, event.curcmd, event.rowcount or 0, token))
            last_done = (len(parts) - 1, event)
        if final:
            if last_done is not None and last_done[0] == len(parts) - 1:
                event = last_done[1]
                status = tds.DONE_COUNT if event.rowcount is not None else 0
                parts[-1] = tds.done(status, event.curcmd, event.rowcount or 0, token)
            else:
                parts.append(tds.done(tds.DONE_FINAL))
        return b"".join(parts)

    async def _rpc(self, call: tds.RpcCall, *, last: bool) -> bytes:
        session = self.session
        assert session is not None
        proc = call.proc_id
        name = call.name.split(".")[-1].strip("[]").lower() if call.name else ""
        if proc is None:
            proc = _PROC_NAMES.get(name)
        params = call.params
        more = 0 if last else tds.DONE_MORE
        out = bytearray()
        handle_out: int | None = None
        error = False
        if proc in (tds.ProcId.SP_PREPEXEC, tds.ProcId.SP_PREPARE) and len(params) >= 3:
            declaration, statement = str(params[1].value or ""), str(params[2].value or "")
            handle_out = session.prepare(statement, declaration)
            if proc == tds.ProcId.SP_PREPEXEC:
                values = [(p.name, p.value) for p in params[3:]]
                bound = bind(session.prepared[handle_out].param_names, values)
                rendered, error = await self._run(
                    "rpc", statement, session.execute, statement, bound, in_proc=True
                )
                out += rendered
        elif proc == tds.ProcId.SP_EXECUTE and params:
            handle = int(params[0].value or 0)
            prepared = session.prepared.get(handle)
            values = [(p.name, p.value) for p in params[1:]]
            rendered, error = await self._run(
                "rpc",
                prepared.sql if prepared else f"handle {handle}",
                session.execute_prepared,
                handle,
                values,
                in_proc=True,
            )
            out += rendered
        elif proc == tds.ProcId.SP_EXECUTESQL and params:
            statement = str(params[0].value or "")
            declaration = str(params[1].value or "") if len(params) > 1 else ""
            names = declared_names(declaration)
            bound = bind(names, [(p.name, p.value) for p in params[2:]])
            rendered, error = await self._run(
                "rpc", statement, session.execute, statement, bound, in_proc=True
            )
            out += rendered
        elif proc == tds.ProcId.SP_UNPREPARE and params:
            session.unprepare(int(params[0].value or 0))
            self._record("rpc", f"sp_unprepare {params[0].value}")
        else:
            label = call.name or f"procedure id {proc}"
            self._record("rpc", label, 2812)
            out += self._error(2812, f"Could not find stored procedure '{label}'.", 16, 62)
            error = True
        out += tds.return_status(0)
        if handle_out is not None:
            out += tds.return_value(0, "@handle", tds.INT, handle_out)
        status = more | (tds.DONE_ERROR if error else 0)
        out += tds.done(status, tds.CurCmd.EXECUTE, 0, tds.Token.DONEPROC)
        return bytes(out)

    async def _transaction(self, request: tds.TransactionRequest) -> bytes:
        session = self.session
        assert session is not None
        kind = (
            tds.TmRequest(request.kind)
            if request.kind in tds.TmRequest._value2member_map_
            else None
        )
        try:
            # COMMIT may fsync: engine work stays off the event loop.
            if kind == tds.TmRequest.BEGIN:
                events = session.begin() if session.trancount == 0 else []
            elif kind == tds.TmRequest.COMMIT:
                events = await asyncio.to_thread(session.commit, begin_after=request.begin_after)
            elif kind == tds.TmRequest.ROLLBACK:
                events = await asyncio.to_thread(session.rollback, begin_after=request.begin_after)
            else:
                raise SqlError(0, f"Unsupported transaction manager request {request.kind}.")
        except SqlError as error:
            self._record("tm", f"{request.kind}", error.number)
            return self._error(error.number, error.message, error.severity, error.state) + tds.done(
                tds.DONE_ERROR
            )
        self._record("tm", kind.name if kind else str(request.kind))
        return self._render(events, in_proc=False) + tds.done(tds.DONE_FINAL)


def build_server(
    spec: ServerSpec,
    data_dir: Path,
    verifier: TokenVerifier,
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
    entra_url: str,
    ca_file: Path | None,
    port: int = 0,
    node_address: str | None = None,
    node_port: int | None = None,
) -> EmulatedServer:
    """An emulated server with its databases created (seeded) on first use."""
    directory = None
    if spec.reader_app_id and spec.reader_secret:
        directory = GraphDirectory(
            entra_url, spec.tenant, spec.reader_app_id, spec.reader_secret, ca_file
        )
    databases: dict[str, Database] = {}
    for db_spec in spec.databases:
        database = Database(
            spec.name,
            db_spec.name,
            data_dir / spec.name / f"{db_spec.name}.sqlite",
            tenant=spec.tenant,
            directory=directory,
        )
        if not database.exists():
            database.create(db_spec.seed, db_spec.users)
        databases[db_spec.name.lower()] = database
    return EmulatedServer(
        spec,
        databases,
        verifier,
        contexts,
        port=port,
        node_address=node_address,
        node_port=node_port,
    )
