"""A SQL client that logs in with Entra tokens the way Azure SQL needs it.

* **One token per physical connection.** A token is fetched (from the credential's cache when it is
  still fresh) only when a connection is opened, and passed to the ODBC driver as
  ``SQL_COPT_SS_ACCESS_TOKEN`` (a little-endian u32 length followed by the UTF-16LE token). Queries
  reuse the open connection: never a token per query.
* **Recycled before the token expires.** Azure SQL checks the token only at login, so the client
  reopens its connection ``recycle_margin_s`` before the token's expiry rather than letting a
  connection outlive its credential (and fail later, somewhere less obvious).
* **Retries with capped backoff** on Azure SQL's transient errors (40613, 40197, 40501, 49918,
  4060, ...) and broken or refused connections, both at login and for a query (which is then run
  again on a new connection: use it for idempotent statements). Everything else fails at once with
  an exception from ``errors.py`` that says what to change.
"""

from __future__ import annotations

import contextlib
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pyodbc

from swi_workload.errors import (
    DatabaseUnavailableError,
    DatabaseUserMissingError,
    PermissionDeniedError,
    QueryError,
    ServerUnreachableError,
    SqlFailure,
    TokenRejectedError,
    WorkloadError,
    parse_odbc_error,
)
from swi_workload.settings import Settings
from swi_workload.tokens import TokenSource, unverified_claims

SQL_COPT_SS_ACCESS_TOKEN = 1256


def token_struct(token: str) -> bytes:
    """The ODBC driver's access-token attribute value for ``token``."""
    raw = token.encode("utf-16-le")
    return struct.pack(f"<I{len(raw)}s", len(raw), raw)


def quote_name(name: str) -> str:
    return "[" + name.replace("]", "]]") + "]"


@dataclass(frozen=True)
class QueryResult:
    columns: list[str]
    rows: list[tuple[Any, ...]]
    rowcount: int


@dataclass
class ClientStats:
    connects: int = 0  # physical connections opened
    token_requests: int = 0  # calls to the credential (cached or not)
    retries: int = 0  # transient failures that were retried
    queries: int = 0


class SqlClient:
    """A reusable, thread-safe connection to one Azure SQL database (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        *,
        tokens: TokenSource | None = None,
        connect: Callable[..., Any] = pyodbc.connect,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        autocommit: bool = True,
    ) -> None:
        self.settings = settings
        self._tokens = tokens or TokenSource(settings)
        self._connect_fn = connect
        self._clock = clock
        self._sleep = sleep
        self._autocommit = autocommit
        self._lock = threading.RLock()
        self._conn: Any = None
        self._expires_on = 0.0
        self.stats = ClientStats()

    # -- connections

    def connection(self) -> Any:
        """The open connection, reopened with a fresh token when the current one nears expiry."""
        with self._lock:
            if self._conn is not None and self._clock() >= (
                self._expires_on - self.settings.recycle_margin_s
            ):
                self._discard()
            if self._conn is None:
                self._conn = self._open()
            return self._conn

    def _open(self) -> Any:
        delays = self.settings.backoff.delays()
        for attempt in range(len(delays) + 1):
            before = self._tokens.requests
            token = self._tokens.get()
            self.stats.token_requests += self._tokens.requests - before
            try:
                conn = self._connect_fn(
                    self.settings.connection_string(),
                    attrs_before={SQL_COPT_SS_ACCESS_TOKEN: token_struct(token.token)},
                    autocommit=self._autocommit,
                    # SQL_ATTR_LOGIN_TIMEOUT: driver 18 ignores "Connection Timeout" (15 s).
                    timeout=self.settings.login_timeout_s,
                )
            except pyodbc.Error as exc:
                failure = parse_odbc_error(exc)
                if (failure.transient or failure.unreachable) and attempt < len(delays):
                    self.stats.retries += 1
                    self._sleep(delays[attempt])
                    continue
                raise self._login_error(failure, token.token) from exc
            self.stats.connects += 1
            self._expires_on = float(token.expires_on)
            return conn
        raise AssertionError("unreachable")

    def _discard(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(pyodbc.Error):
                conn.close()

    def close(self) -> None:
        with self._lock:
            self._discard()

    def __enter__(self) -> SqlClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- queries

    def query(self, sql: str, *params: Any) -> QueryResult:
        """Run ``sql`` (``?`` placeholders) and fetch every row, retrying transient failures."""
        delays = self.settings.backoff.delays()
        with self._lock:
            for attempt in range(len(delays) + 1):
                conn = self.connection()
                try:
                    # Closed before the lock is released: the driver allows one active statement
                    # per connection, and a cursor left to the garbage collector would still be
                    # open when another thread's query starts ("Connection is busy with results
                    # for another command").
                    with contextlib.closing(conn.cursor()) as cursor:
                        cursor.execute(sql, *params)
                        columns = [d[0] for d in cursor.description or []]
                        rows = [tuple(r) for r in cursor.fetchall()] if cursor.description else []
                        self.stats.queries += 1
                        return QueryResult(columns, rows, cursor.rowcount)
                except pyodbc.Error as exc:
                    failure = parse_odbc_error(exc)
                    if failure.transient or failure.unreachable or failure.sqlstate == "08S01":
                        self._discard()
                        if attempt < len(delays):
                            self.stats.retries += 1
                            self._sleep(delays[attempt])
                            continue
                        raise self._exhausted(failure) from exc
                    raise self._query_error(failure, conn) from exc
        raise AssertionError("unreachable")

    # -- error translation

    def _exhausted(self, failure: SqlFailure) -> WorkloadError:
        attempts = self.settings.backoff.attempts
        if failure.transient:
            return DatabaseUnavailableError(
                f"database {self.settings.database!r} stayed unavailable after {attempts} "
                f"attempts: {failure.message} ({failure.number})"
            )
        return ServerUnreachableError(
            f"cannot reach SQL server {self.settings.server!r} after {attempts} attempts: "
            f"{failure.message}. Check AZ_SERVER (tcp:<name>.database.windows.net,1433), DNS, "
            "the server's firewall rules and the pod's egress"
        )

    def _login_error(self, failure: SqlFailure, token: str) -> WorkloadError:
        if failure.transient or failure.unreachable:
            return self._exhausted(failure)
        if failure.number == 18456:
            if "Token is expired" in failure.message:
                return TokenRejectedError(
                    f"{failure.message} The access token expired before the login; check the "
                    "pod's clock and that connections are recycled before token expiry"
                )
            if "not currently configured to accept this token" in failure.message:
                claims = unverified_claims(token)
                return TokenRejectedError(
                    f"{failure.message} The token is for audience '{claims.get('aud')}' in tenant "
                    f"'{claims.get('tid')}': request scope https://database.windows.net/.default "
                    "in the tenant of the SQL server's Entra admin"
                )
            return DatabaseUserMissingError(self._missing_user_message(failure, token))
        return QueryError(f"login failed: {failure.message} ({failure.number})")

    def _missing_user_message(self, failure: SqlFailure, token: str) -> str:
        claims = unverified_claims(token)
        client_id = claims.get("appid") or self.settings.client_id or "?"
        name = claims.get("app_displayname") or client_id
        object_id = claims.get("oid")
        create = f"CREATE USER {quote_name(str(name))} FROM EXTERNAL PROVIDER"
        if object_id:
            create += f" WITH OBJECT_ID = '{object_id}'"
        return (
            f"{failure.message} The token is valid, but database {self.settings.database!r} has "
            f"no user for application {client_id}. As the server's Entra admin, run in "
            f"{self.settings.database!r}: {create}; ALTER ROLE db_datareader ADD MEMBER "
            f"{quote_name(str(name))};"
        )

    def _query_error(self, failure: SqlFailure, conn: Any) -> WorkloadError:
        if failure.number == 229:
            user = self._current_user(conn)
            role = "db_datareader" if "SELECT" in failure.message else "db_datawriter"
            return PermissionDeniedError(
                f"{failure.message} Grant the role: ALTER ROLE {role} ADD MEMBER "
                f"{quote_name(user)};"
            )
        return QueryError(f"{failure.message} ({failure.number})")

    @staticmethod
    def _current_user(conn: Any) -> str:
        try:
            row = conn.cursor().execute("SELECT USER_NAME()").fetchone()
        except pyodbc.Error:
            return "<user>"
        return str(row[0]) if row else "<user>"


def rows_as_dicts(result: QueryResult) -> list[dict[str, Any]]:
    return [dict(zip(result.columns, row, strict=True)) for row in result.rows]


def run_query(settings: Settings, sql: str, params: Sequence[Any] = ()) -> QueryResult:
    """One query on a short-lived client (for scripts; services keep a :class:`SqlClient`)."""
    with SqlClient(settings) as client:
        return client.query(sql, *params)
