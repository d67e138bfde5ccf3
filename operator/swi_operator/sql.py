"""The Azure SQL side of the operator behind one narrow interface, ``Database``.

Two kinds of session, both through the Microsoft ODBC Driver 18 with an Entra access token
(``swi_workload.SqlClient``: a token per physical connection, passed as the access-token struct):

* the operator's own, as its Entra identity (it must be the server's Entra admin, or a member of
  its admin group): long-lived ``SqlClient`` sessions per (server, database), as many as queries
  run at once (``concurrency``) and reused, whose tokens come from the operator's one async
  credential (``_LoopCredential`` bridges it to the driver's worker thread). One shared session
  ran every resource's statements one after another: onboarding 1000 resources is some 3,000
  statements (bench/onboarding.py), tens of seconds in a queue at Azure SQL's round trips;
* the verification probe's, as the federated identity: a short-lived client that logs in with the
  access token Entra just issued for the service account's token, and is closed at once.

pyodbc blocks, so every call runs in a small thread pool of its own (``concurrency`` threads behind
a semaphore of the same size), never in the event loop's default executor that the Kubernetes
client shares. ``SqlClient`` runs with a single attempt: retries belong to kopf (errors.py).

Statements that name principals cannot take parameters in T-SQL (``CREATE USER``, ``ALTER ROLE``,
``DROP USER``), so names are quoted here, by doubling ``]`` inside brackets, and nothing else is
ever put in SQL text: lookups take their values as parameters; a SID is written as hex digits of
bytes; an object id only after it parsed as a GUID. The database name goes into the connection
string braced (``{...}``, ``}`` doubled), so a ``;`` in it cannot add a keyword.

``spec.sql.server`` is user input too, and a login hands the server an Entra token that works on
every server its principal may use (the operator's is an admin's): no session is opened to a host
outside ``--allowed-sql-server`` (Azure SQL's suffixes and loopback by default).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

import pyodbc
from azure.core.credentials import AccessToken
from azure.core.credentials_async import AsyncTokenCredential
from swi_workload import (
    Backoff,
    NoMatchingFederatedCredentialError,
    NotFederatedError,
    Settings,
    SqlClient,
    TokenServiceError,
    TokenSource,
    WorkloadError,
)
from swi_workload.errors import SqlFailure, parse_odbc_error
from swi_workload.tokens import unverified_claims

from swi_operator.cycle import changed, shared_read
from swi_operator.errors import (
    PermanentError,
    Reason,
    operator_authentication_error,
    sql_error,
)
from swi_operator.locks import SharedSlots

T = TypeVar("T")

MAX_NAME_LENGTH = 128  # sysname
LOGIN_TIMEOUT_S = 15
DEFAULT_LOCK_TIMEOUT_S = 5.0  # SET LOCK_TIMEOUT of every statement the operator runs
DEFAULT_STATEMENT_TIMEOUT_S = 30.0  # the ODBC query timeout of each of them
TOKEN_TIMEOUT_S = 60.0
PROBE_TOKEN_LIFETIME_S = 3600.0  # for a probe token without "exp" (Entra's always have one)


@dataclass(frozen=True)
class SqlTarget:
    """One database, with the server as ODBC's ``SERVER=`` takes it (``spec.sql.server``)."""

    server: str
    database: str

    @property
    def display(self) -> str:
        return f"database {self.database!r} on {self.server}"


@dataclass(frozen=True)
class Principal:
    """A database principal found by name or SID, with the roles it is a member of."""

    name: str
    type: str  # E: external user, X: external group, R: role, S: SQL user, ...
    sid: bytes | None
    roles: frozenset[str]


class SqlFailed(Exception):
    """The probe's session failed ``during`` its login or a query (``failure`` says how)."""

    def __init__(self, failure: SqlFailure, during: Literal["login", "query"]) -> None:
        super().__init__(failure.message)
        self.failure = failure
        self.during = during


# A first probe of a resource may run its queries on a session another probe of the same
# identity logged in to this recently (``Database.probe``'s ``share``).
PROBE_SESSION_SHARED_S = 30.0


@dataclass(frozen=True)
class Probed:
    """What a probe found: the user its session runs as, and, when its queries ran on a session
    another probe of the identity logged in to, how many seconds ago that login was."""

    user: str
    login_age: float | None = None


class Database(Protocol):
    async def role_names(self, target: SqlTarget) -> set[str]: ...

    async def ddl_triggers(self, target: SqlTarget) -> list[str]:
        """The database's DDL triggers (``sys.triggers``, ``parent_class = 0``), by name."""
        ...

    async def find_principals(self, target: SqlTarget, name: str, sid: bytes) -> list[Principal]:
        """Principals named ``name`` (case-insensitively, like the database) or with ``sid``."""
        ...

    async def create_user(
        self, target: SqlTarget, name: str, sid: bytes, object_id: str | None
    ) -> None:
        """``WITH SID = ..., TYPE = E``; ``FROM EXTERNAL PROVIDER WITH OBJECT_ID`` if given one.
        ``UserExists`` if the name was taken since it was looked up."""
        ...

    async def drop_user(self, target: SqlTarget, name: str) -> None: ...

    async def set_role_member(
        self, target: SqlTarget, role: str, name: str, member: bool
    ) -> None: ...

    async def probe(
        self, target: SqlTarget, access_token: str, read_table: bool, share: bool = False
    ) -> Probed:
        """Log in with ``access_token``, ``SELECT USER_NAME()``, and with ``read_table`` the column
        metadata of a dbo table (a SELECT permission check that reads no row). The user's name, or
        ``SqlFailed``; transient failures leave as ``TransientError``. With ``share``, the queries
        may run on a session of the same identity (the token's tenant and object id) that another
        probe logged in to at most ``PROBE_SESSION_SHARED_S`` ago, instead of a login of its
        own; a failure there is answered by a login of its own."""
        ...


USER_EXISTS_ERROR = 15023  # "User, group, or role '%s' already exists in the current database."


class UserExists(Exception):
    """CREATE USER found its name taken: another session (another cluster's operator on the same
    identity, a person) created it between the operator's look and its statement."""


# -- statements ------------------------------------------------------------------------------------


def quote_name(name: str) -> str:
    """``name`` as a bracketed T-SQL identifier; ValueError if no identifier can hold it."""
    if not 1 <= len(name) <= MAX_NAME_LENGTH:
        raise ValueError(f"{name!r} is not 1 to {MAX_NAME_LENGTH} characters long")
    if any(ord(c) < 0x20 or c == "\x7f" for c in name):
        raise ValueError(f"{name!r} contains control characters")
    return "[" + name.replace("]", "]]") + "]"


def server_host(server: str) -> str:
    """The host of an ODBC ``SERVER=`` value (``tcp:host,port``, ``host,port`` or ``host``)."""
    return server.strip().removeprefix("tcp:").split(",", 1)[0].strip().lower()


def server_allowed(server: str, allowed: Sequence[str]) -> bool:
    """Whether ``server``'s host is one of ``allowed`` (host names, or ``.suffixes``)."""
    host = server_host(server)
    return any(
        host.endswith(entry) if entry.startswith(".") else host == entry for entry in allowed
    )


def sid_of(client_id: str) -> bytes:
    """Azure SQL's SID of an app or managed identity: its client id's GUID bytes, little-endian."""
    return uuid.UUID(client_id).bytes_le


def create_user_sql(name: str, sid: bytes, object_id: str | None = None) -> str:
    if object_id is not None:
        guid = str(uuid.UUID(object_id))  # ValueError unless a GUID
        return f"CREATE USER {quote_name(name)} FROM EXTERNAL PROVIDER WITH OBJECT_ID = '{guid}'"
    if len(sid) != 16:
        raise ValueError("an external user's SID is 16 bytes")
    return f"CREATE USER {quote_name(name)} WITH SID = 0x{sid.hex().upper()}, TYPE = E"


def drop_user_sql(name: str) -> str:
    return f"DROP USER IF EXISTS {quote_name(name)}"


def role_member_sql(role: str, name: str, member: bool) -> str:
    verb = "ADD" if member else "DROP"
    return f"ALTER ROLE {quote_name(role)} {verb} MEMBER {quote_name(name)}"


ROLES_SQL = "SELECT name FROM sys.database_principals WHERE type = 'R'"
PRINCIPALS_SQL = (
    "SELECT p.name, p.type, p.sid, r.name FROM sys.database_principals AS p "
    "LEFT JOIN sys.database_role_members AS m ON m.member_principal_id = p.principal_id "
    "LEFT JOIN sys.database_principals AS r ON r.principal_id = m.role_principal_id "
    "WHERE p.name = ? OR p.sid = ?"
)
# The probe's query; with the read check, also the table it reads: dbo's first by name that the
# user can see (schema_id 1 is dbo).
PROBE_SQL = "SELECT USER_NAME()"
PROBE_READ_SQL = (
    "SELECT USER_NAME(), (SELECT TOP (1) name FROM sys.tables WHERE schema_id = 1 ORDER BY name)"
)


DDL_TRIGGERS_SQL = "SELECT name FROM sys.triggers WHERE parent_class = 0 ORDER BY name"


def with_lock_timeout(sql: str, milliseconds: int) -> str:
    """``sql`` after ``SET LOCK_TIMEOUT``: a lock another session holds (a tenant's open
    transaction) fails the statement with 1222 after ``milliseconds`` instead of holding one of
    the operator's sessions for as long as that transaction stays open (Azure's default: -1)."""
    return f"SET LOCK_TIMEOUT {int(milliseconds)};\n{sql}"


def odbc_braced(value: str) -> str:
    """An ODBC connection-string value that may contain ``;`` or ``}``."""
    return "{" + value.replace("}", "}}") + "}"


class _Settings(Settings):
    """swi_workload's settings, with the database braced in the connection string (it comes from
    a resource's spec, and may contain ``;``)."""

    def connection_string(self) -> str:
        return (
            f"DRIVER={{{self.driver}}};SERVER={self.server};"
            f"DATABASE={odbc_braced(self.database)};"
            f"Encrypt={self.encrypt};TrustServerCertificate=no"
        )


def _settings(target: SqlTarget, client_id: str | None) -> Settings:
    return _Settings(
        server=target.server,
        database=target.database,
        client_id=client_id,
        login_timeout_s=LOGIN_TIMEOUT_S,
        backoff=Backoff(attempts=1),  # one attempt: kopf retries (errors.py)
    )


def failure_of(exc: BaseException) -> SqlFailure:
    """The ODBC error behind a ``SqlClient`` exception (it chains the pyodbc error)."""
    cause = exc.__cause__
    if isinstance(cause, pyodbc.Error):
        return parse_odbc_error(cause)
    return SqlFailure("", None, str(exc))


# The operator's own token failed (swi_workload's TokenSource translates azure-identity's errors).
_OWN_TOKEN_ERRORS = (TokenServiceError, NoMatchingFederatedCredentialError, NotFederatedError)


# -- tokens ----------------------------------------------------------------------------------------


class _LoopCredential:
    """The operator's async credential, for the worker thread a connection is opened in: the
    request runs on the event loop (one token cache for the whole operator), the thread waits."""

    def __init__(self, credential: AsyncTokenCredential, loop: asyncio.AbstractEventLoop) -> None:
        self._credential = credential
        self._loop = loop

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        request = self._credential.get_token(*scopes, **kwargs)
        return asyncio.run_coroutine_threadsafe(request, self._loop).result(TOKEN_TIMEOUT_S)


class _GivenToken:
    """An access token obtained elsewhere (the probe's token exchange)."""

    def __init__(self, token: str, expires_on: int) -> None:
        self._token = AccessToken(token, expires_on)

    def get_token(self, *_scopes: str, **_kwargs: Any) -> AccessToken:
        return self._token


def _probe_queries(client: SqlClient, read_table: bool) -> str:
    """The probe's queries on a logged-in session: the user's name (and, with ``read_table``, a
    dbo table's columns: a SELECT permission check that reads no row)."""
    try:
        # One round trip for the name and the table to read (issue 23: four queries per probe
        # were a sixth of the operator's SQL calls while onboarding).
        row = client.query(PROBE_READ_SQL if read_table else PROBE_SQL).rows[0]
        user = str(row[0])
        if read_table and row[1] is not None:
            client.query(f"SELECT TOP (0) * FROM [dbo].{quote_name(str(row[1]))}")
    except WorkloadError as exc:
        raise SqlFailed(failure_of(exc), "query") from exc
    return user


# -- the ODBC implementation -----------------------------------------------------------------------


class OdbcDatabase:
    """``Database`` over pyodbc, as the operator's identity (see the module docstring)."""

    def __init__(
        self,
        credential: AsyncTokenCredential,
        operator_client_id: str,
        concurrency: int,
        allowed_servers: Sequence[str],
        clock: Callable[[], float] = time.time,
        *,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT_S,
        statement_timeout: float = DEFAULT_STATEMENT_TIMEOUT_S,
    ) -> None:
        self._credential = credential
        self._allowed = tuple(allowed_servers)
        self._client_id = operator_client_id
        self._operator = f"the operator's identity (client id {operator_client_id})"
        self._executor = ThreadPoolExecutor(concurrency, thread_name_prefix="swi-sql")
        # One database (however its server is spelled) holds at most half of the sessions: a
        # database whose statements wait on a tenant's locks leaves the others the rest.
        self._slots = SharedSlots(concurrency)
        self._lock_timeout_ms = int(lock_timeout * 1000)
        self._statement_timeout = max(1, int(statement_timeout))
        self._clients: dict[SqlTarget, list[SqlClient]] = {}  # every session opened
        self._idle: dict[SqlTarget, list[SqlClient]] = {}  # those no query is using
        # Probe sessions no probe is using, by identity and database, with their login time.
        self._probe_sessions: dict[tuple[str, SqlTarget], list[tuple[float, SqlClient]]] = {}
        self._clock = clock

    @staticmethod
    def _slot_key(target: SqlTarget) -> str:
        """One database, however its server is spelled."""
        return f"{server_host(target.server)}/{target.database.lower()}"

    def _slot(self, target: SqlTarget) -> AbstractAsyncContextManager[None]:
        return self._slots.hold(self._slot_key(target))

    async def _in_thread(self, target: SqlTarget, fn: Callable[[], T]) -> T:
        async with self._slot(target):
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def _check_server(self, target: SqlTarget) -> None:
        """An Entra token for Azure SQL works on every server its principal may use, and a login
        hands it to the server: never to one outside ``--allowed-sql-server``."""
        if not server_allowed(target.server, self._allowed):
            raise PermanentError(
                Reason.SQL_SERVER_NOT_ALLOWED,
                f"spec.sql.server {target.server!r} is not a server this operator logs in to "
                f"(its host must be one of, or end in one of: {', '.join(self._allowed)}); "
                "use the server's Azure name, or add it with --allowed-sql-server",
            )

    def _take(self, target: SqlTarget) -> SqlClient:
        """An idle session of the operator's for ``target``, or a new one (on the event loop, once
        a slot is held: never more sessions per target than ``concurrency``)."""
        idle = self._idle.setdefault(target, [])
        if idle:
            return idle.pop()
        settings = _settings(target, self._client_id)
        loop = asyncio.get_running_loop()
        tokens = TokenSource(settings, credential=_LoopCredential(self._credential, loop))
        client = SqlClient(settings, tokens=tokens)
        self._clients.setdefault(target, []).append(client)
        return client

    async def _query(
        self, target: SqlTarget, doing: str, sql: str, *params: Any
    ) -> list[tuple[Any, ...]]:
        self._check_server(target)

        def run(client: SqlClient) -> list[tuple[Any, ...]]:
            try:
                # The query timeout (SQL_ATTR_QUERY_TIMEOUT) of the cursors the client opens on
                # this connection; LOCK_TIMEOUT rides with each statement, whatever the session.
                client.connection().timeout = self._statement_timeout
                return client.query(with_lock_timeout(sql, self._lock_timeout_ms), *params).rows
            except _OWN_TOKEN_ERRORS as exc:
                raise operator_authentication_error(exc, f"{doing} in {target.display}") from exc
            except WorkloadError as exc:
                raise sql_error(failure_of(exc), target.display, doing, self._operator) from exc

        async with self._slot(target):
            client = self._take(target)
            try:
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(self._executor, run, client)
            finally:
                self._idle[target].append(client)

    async def ddl_triggers(self, target: SqlTarget) -> list[str]:
        rows = await shared_read(
            ("ddl-triggers", target),
            lambda: self._query(target, "list the database's DDL triggers", DDL_TRIGGERS_SQL),
        )
        return [str(row[0]) for row in rows]

    async def role_names(self, target: SqlTarget) -> set[str]:
        rows = await shared_read(
            ("roles", target), lambda: self._query(target, "list the database roles", ROLES_SQL)
        )
        return {str(row[0]) for row in rows}

    async def find_principals(self, target: SqlTarget, name: str, sid: bytes) -> list[Principal]:
        rows = await shared_read(
            ("principals", target, name.lower(), sid),
            lambda: self._query(
                target, f"look up the database user {name!r}", PRINCIPALS_SQL, name, sid
            ),
        )
        found: dict[str, tuple[str, bytes | None, set[str]]] = {}
        for principal, type_, principal_sid, role in rows:
            entry = found.setdefault(
                str(principal),
                (str(type_).strip(), bytes(principal_sid) if principal_sid else None, set()),
            )
            if role is not None:
                entry[2].add(str(role))
        return [Principal(n, t, s, frozenset(r)) for n, (t, s, r) in found.items()]

    async def create_user(
        self, target: SqlTarget, name: str, sid: bytes, object_id: str | None
    ) -> None:
        try:
            await self._query(
                target, f"create the user {name!r}", create_user_sql(name, sid, object_id)
            )
        except PermanentError as err:
            cause = err.__cause__
            if cause is not None and failure_of(cause).number == USER_EXISTS_ERROR:
                raise UserExists(err.message) from err
            raise
        finally:
            changed(("principals", target))

    async def drop_user(self, target: SqlTarget, name: str) -> None:
        try:
            await self._query(target, f"drop the user {name!r}", drop_user_sql(name))
        finally:
            changed(("principals", target))

    async def set_role_member(self, target: SqlTarget, role: str, name: str, member: bool) -> None:
        doing = f"{'add' if member else 'remove'} {name!r} {'to' if member else 'from'} {role}"
        try:
            await self._query(target, doing, role_member_sql(role, name, member))
        finally:
            changed(("principals", target))

    async def probe(
        self, target: SqlTarget, access_token: str, read_table: bool, share: bool = False
    ) -> Probed:
        self._check_server(target)
        claims = unverified_claims(access_token)
        identity = (f"{claims.get('tid')}/{claims.get('oid') or claims.get('appid')}", target)
        shared = self._shared_session(identity) if share else None
        if shared is not None:
            logged_in, client = shared
            try:
                user = await self._in_thread(target, lambda: _probe_queries(client, read_table))
            except SqlFailed:
                # Whatever it was (the session dropped, a permission gone), a login of its own
                # gives the verdict.
                await self._in_thread(target, client.close)
            except BaseException:
                # Cancelled (or a bug): the session is nobody's now. Closed off the loop, after
                # the query a thread may still run on it (the client's lock orders them).
                self._executor.submit(client.close)
                raise
            else:
                self._keep_session(identity, logged_in, client)
                return Probed(user, max(0.0, self._clock() - logged_in))

        def run() -> tuple[str, SqlClient]:
            settings = _settings(target, None)
            # Its real expiry, or the client would recycle the connection before each query.
            expires = claims.get("exp")
            if not isinstance(expires, int):
                expires = int(self._clock() + PROBE_TOKEN_LIFETIME_S)
            tokens = TokenSource(settings, credential=_GivenToken(access_token, expires))
            client = SqlClient(settings, tokens=tokens)
            try:
                try:
                    client.connection()
                except WorkloadError as exc:
                    raise SqlFailed(failure_of(exc), "login") from exc
                return _probe_queries(client, read_table), client
            except BaseException:
                client.close()
                raise

        logged_in = self._clock()
        try:
            user, client = await self._in_thread(target, run)
        except SqlFailed as exc:
            if exc.failure.transient or exc.failure.unreachable:
                raise sql_error(exc.failure, target.display, "verify", "the identity") from exc
            raise
        self._keep_session(identity, logged_in, client)
        return Probed(user)

    def _shared_session(self, identity: tuple[str, SqlTarget]) -> tuple[float, SqlClient] | None:
        """An idle probe session of ``identity`` logged in to recently enough, if there is one;
        the others are closed (off the loop)."""
        idle = self._probe_sessions.get(identity, [])
        fresh_after = self._clock() - PROBE_SESSION_SHARED_S
        while idle:
            logged_in, client = idle.pop()
            if logged_in >= fresh_after:
                return logged_in, client
            self._executor.submit(client.close)
        self._probe_sessions.pop(identity, None)
        return None

    def _keep_session(
        self, identity: tuple[str, SqlTarget], logged_in: float, client: SqlClient
    ) -> None:
        if self._clock() - logged_in < PROBE_SESSION_SHARED_S:
            self._probe_sessions.setdefault(identity, []).append((logged_in, client))
        else:
            self._executor.submit(client.close)

    async def close(self) -> None:
        clients = [client for opened in self._clients.values() for client in opened]
        clients += [client for idle in self._probe_sessions.values() for _, client in idle]
        self._clients, self._idle, self._probe_sessions = {}, {}, {}

        def close_all() -> None:
            for client in clients:
                with contextlib.suppress(Exception):
                    client.close()

        await asyncio.get_running_loop().run_in_executor(self._executor, close_all)
        self._executor.shutdown(wait=False)


def roles_in(names: Sequence[str], existing: set[str]) -> tuple[list[str], list[str]]:
    """``names`` split into (found, missing) against the database's roles, compared
    case-insensitively (the database's collation); found ones as the database spells them."""
    by_lower = {role.lower(): role for role in existing}
    found = [by_lower[n.lower()] for n in names if n.lower() in by_lower]
    missing = [n for n in names if n.lower() not in by_lower]
    return found, missing
