"""The Azure SQL emulator as a database administrator and a tester see it, for the operator's
database-access and Verified tests: sessions with an Entra token (the real ODBC driver), the
database's users and roles, the emulator's query log and its fault injection.

The database is shared by the whole test session (other suites read the seed's Customer table as
SP-AZURESQL-USER), so ``restore_seed`` puts it back as the world seeds it after every test."""

from __future__ import annotations

import json
import os
import re
import struct
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyodbc
import requests

SQL_SCOPE = "https://database.windows.net/.default"
DATABASE = "mydb"
SEEDED_USER = "SP-AZURESQL-USER"


def token_struct(token: str) -> bytes:
    raw = token.encode("utf-16-le")
    return struct.pack(f"<I{len(raw)}s", len(raw), raw)


class SqlAdmin:
    def __init__(self, state_dir: Path, tenant: str, admin_client_id: str, admin_secret: str):
        info = json.loads((state_dir / "azuresql.json").read_text())
        self.server: str = info["env"]["AZ_SERVER"]
        self.admin_url: str = info["admin_url"]
        self.ca = str(state_dir / "ca.crt")
        self.tenant = tenant
        self._admin = (admin_client_id, admin_secret)
        self._tokens: dict[str, str] = {}  # client id -> token (tests may slow Entra down)

    # -- sessions

    def secret_token(self, client_id: str, secret: str) -> str:
        if client_id in self._tokens:
            return self._tokens[client_id]
        response = requests.post(
            f"{os.environ['AZURE_AUTHORITY_HOST']}/{self.tenant}/oauth2/v2.0/token",
            data={
                "grant_type": "client_credentials",
                "client_id": client_id,
                "client_secret": secret,
                "scope": SQL_SCOPE,
            },
            verify=self.ca,
            timeout=10,
        )
        response.raise_for_status()
        self._tokens[client_id] = str(response.json()["access_token"])
        return self._tokens[client_id]

    @contextmanager
    def session(self, token: str | None = None, database: str = DATABASE) -> Iterator[Any]:
        """A session with ``token`` (default: the server's Entra admin's, i.e. dbo)."""
        token = token or self.secret_token(*self._admin)
        conn = pyodbc.connect(
            f"DRIVER={{ODBC Driver 18 for SQL Server}};SERVER={self.server};"
            f"DATABASE={{{database}}};Encrypt=yes;TrustServerCertificate=no",
            attrs_before={1256: token_struct(token)},
            autocommit=True,
            timeout=15,
        )
        try:
            yield conn.cursor()
        finally:
            conn.close()

    def run(self, *statements: str) -> list[Any]:
        """Run statements as dbo; the rows of the last one."""
        rows: list[Any] = []
        with self.session() as cursor:
            for statement in statements:
                cursor.execute(statement)
                rows = [tuple(r) for r in cursor.fetchall()] if cursor.description else []
        return rows

    # -- the database's state

    def users(self) -> dict[str, set[str]]:
        """External users (type E) and their roles."""
        rows = self.run(
            "SELECT p.name, r.name FROM sys.database_principals AS p "
            "LEFT JOIN sys.database_role_members AS m ON m.member_principal_id = p.principal_id "
            "LEFT JOIN sys.database_principals AS r ON r.principal_id = m.role_principal_id "
            "WHERE p.type = 'E'"
        )
        found: dict[str, set[str]] = {}
        for user, role in rows:
            found.setdefault(user, set())
            if role:
                found[user].add(role)
        return found

    def sid(self, name: str) -> bytes | None:
        with self.session() as cursor:
            row = cursor.execute(
                "SELECT sid FROM sys.database_principals WHERE name = ?", name
            ).fetchone()
        return bytes(row[0]) if row else None

    def restore_seed(self, seeded_client_id: str) -> None:
        """Only the seed's user, with only db_datareader."""
        users = self.users()
        statements = [
            f"DROP USER [{name.replace(']', ']]')}]" for name in users if name != SEEDED_USER
        ]
        if SEEDED_USER not in users:
            sid = "0x" + uuid.UUID(seeded_client_id).bytes_le.hex().upper()
            statements.append(f"CREATE USER [{SEEDED_USER}] WITH SID = {sid}, TYPE = E")
        roles = users.get(SEEDED_USER, set())
        statements += [
            f"ALTER ROLE {role} DROP MEMBER [{SEEDED_USER}]"
            for role in roles
            if role != "db_datareader"
        ]
        if "db_datareader" not in roles:
            statements.append(f"ALTER ROLE db_datareader ADD MEMBER [{SEEDED_USER}]")
        if statements:
            self.run(*statements)

    # -- the emulator's test controls

    def _admin_call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = requests.request(method, f"{self.admin_url}{path}", json=body, timeout=10)
        response.raise_for_status()
        return response.json()

    def log(self, since: float = 0.0) -> list[dict[str, Any]]:
        """The emulator's log; the operator's ``SET LOCK_TIMEOUT n;`` prefix (sql.py) is taken
        off each batch's text and kept as ``lock_timeout_ms``, so tests match the statement."""
        entries: list[dict[str, Any]] = self._admin_call("GET", f"/log?since={since}")
        for entry in entries:
            found = _LOCK_PREFIX.match(str(entry.get("text") or ""))
            entry["lock_timeout_ms"] = int(found.group(1)) if found else None
            if found:
                entry["text"] = entry["text"][found.end() :]
        return entries

    def fail_logins(self, count: int, error: int = 40613, server: str = "sandbox-sql") -> None:
        self._admin_call("POST", f"/servers/{server}/fail-logins", {"count": count, "error": error})


_LOCK_PREFIX = re.compile(r"SET LOCK_TIMEOUT (-?\d+);\n")


def wait_for_log(
    sql: SqlAdmin, since: float, text: str, user: str | None = None, timeout: float = 15.0
) -> dict[str, Any]:
    """The first log entry after ``since`` containing ``text`` (by ``user``, if given)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in sql.log(since):
            if text in entry["text"] and (user is None or entry["user"] == user):
                return entry
        time.sleep(0.05)
    raise AssertionError(f"no {text!r} in the SQL emulator's log after {timeout}s")
