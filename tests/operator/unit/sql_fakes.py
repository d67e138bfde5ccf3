"""In-memory stand-ins for the database side (``sql.Database``), Entra's token exchange
(``cloud.exchange.TokenExchange``) and TokenRequest, for unit tests of DatabaseAccessReady and
Verified. They keep the real contracts: names compare case-insensitively like the database's
collation, a SID is unique, ``DROP USER`` of a missing user succeeds, and they record every
statement-level write so tests can assert "no write"."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from swi_operator.cloud.exchange import ExchangeRejected
from swi_operator.errors import ReconcileError
from swi_operator.sql import Principal, Probed, SqlFailed, SqlTarget
from swi_workload.errors import SqlFailure

FIXED_ROLES = {"public", "db_owner", "db_datareader", "db_datawriter", "db_ddladmin"}


@dataclass
class FakeUser:
    name: str
    sid: bytes
    type: str = "E"
    roles: set[str] = field(default_factory=set)


class FakeDatabase:
    def __init__(self) -> None:
        self.users: dict[SqlTarget, list[FakeUser]] = {}
        self.roles: set[str] = set(FIXED_ROLES)
        self.writes: list[str] = []
        self.fail: dict[str, Exception] = {}  # method -> error raised by its next call
        self.probe_failure: SqlFailed | None = None
        self.probes: list[tuple[SqlTarget, str, bool]] = []
        self.shared: list[bool] = []  # each probe's ``share``
        self.login_age: float | None = None  # a shared probe's answer (None: it logged in)
        self.triggers: dict[SqlTarget, list[str]] = {}  # DDL triggers (sys.triggers, class 0)

    def _check(self, method: str) -> None:
        if method in self.fail:
            raise self.fail.pop(method)

    def add_user(
        self, target: SqlTarget, name: str, sid: bytes, roles: set[str] | None = None
    ) -> FakeUser:
        user = FakeUser(name, sid, roles=set(roles or ()))
        self.users.setdefault(target, []).append(user)
        return user

    def user(self, target: SqlTarget, name: str) -> FakeUser | None:
        return next((u for u in self.users.get(target, []) if u.name.lower() == name.lower()), None)

    async def ddl_triggers(self, target: SqlTarget) -> list[str]:
        self._check("ddl_triggers")
        return list(self.triggers.get(target, []))

    async def role_names(self, target: SqlTarget) -> set[str]:
        self._check("role_names")
        return set(self.roles)

    async def find_principals(self, target: SqlTarget, name: str, sid: bytes) -> list[Principal]:
        self._check("find_principals")
        return [
            Principal(u.name, u.type, u.sid, frozenset(u.roles))
            for u in self.users.get(target, [])
            if u.name.lower() == name.lower() or u.sid == sid
        ]

    async def create_user(
        self, target: SqlTarget, name: str, sid: bytes, object_id: str | None
    ) -> None:
        self._check("create_user")
        assert self.user(target, name) is None, "15023: already exists"
        assert all(u.sid != sid for u in self.users.get(target, [])), "15063"
        self.writes.append(f"CREATE USER {name}" + (f" OBJECT_ID {object_id}" if object_id else ""))
        self.add_user(target, name, sid)

    async def drop_user(self, target: SqlTarget, name: str) -> None:
        self._check("drop_user")
        self.writes.append(f"DROP USER {name}")
        self.users[target] = [u for u in self.users.get(target, []) if u.name != name]

    async def set_role_member(self, target: SqlTarget, role: str, name: str, member: bool) -> None:
        self._check("set_role_member")
        user = self.user(target, name)
        assert user is not None and role in self.roles
        self.writes.append(f"{'ADD' if member else 'DROP'} {role} {name}")
        (user.roles.add if member else user.roles.discard)(role)

    async def probe(
        self, target: SqlTarget, access_token: str, read_table: bool, share: bool = False
    ) -> Probed:
        self._check("probe")
        self.probes.append((target, access_token, read_table))
        self.shared.append(share)
        if self.probe_failure is not None:
            raise self.probe_failure
        return Probed("app-name", self.login_age if share else None)


def failed(number: int, message: str, during: str = "login") -> SqlFailed:
    return SqlFailed(SqlFailure("28000", number, message), during)  # type: ignore[arg-type]


def jwt(claims: Mapping[str, Any]) -> str:
    """An unsigned JWT with ``claims`` (the steps only read claims, never verify them)."""

    def part(data: Mapping[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none'})}.{part(claims)}.sig"


class FakeTokens:
    """TokenRequest: a token whose claims say what the API server would put in them."""

    def __init__(self, issuer: str) -> None:
        self.issuer = issuer
        self.requests: list[tuple[str, str, str, int]] = []

    async def request_token(
        self, namespace: str, service_account: str, audience: str, expiration_seconds: int
    ) -> str:
        self.requests.append((namespace, service_account, audience, expiration_seconds))
        return jwt(
            {
                "iss": self.issuer,
                "sub": f"system:serviceaccount:{namespace}:{service_account}",
                "aud": [audience],
            }
        )


class FakeExchange:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []
        self.rejections: list[ExchangeRejected] = []  # answered in order before succeeding
        self.error: ReconcileError | None = None

    def reject(self, code: int, text: str, times: int = 1) -> None:
        error = ExchangeRejected(400, "invalid_request", (code,), f"AADSTS{code}: {text}")
        self.rejections.extend([error] * times)

    async def exchange(self, tenant_id: str, client_id: str, assertion: str, scope: str) -> str:
        self.calls.append((tenant_id, client_id, scope))
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        if self.rejections:
            raise self.rejections.pop(0)
        return jwt({"appid": client_id, "oid": f"sp-of-{client_id}", "tid": tenant_id})
