"""Settings from the environment a federated pod gets, plus the seed's own variable names.

The identity webhook injects ``AZURE_CLIENT_ID``, ``AZURE_TENANT_ID``,
``AZURE_FEDERATED_TOKEN_FILE`` and ``AZURE_AUTHORITY_HOST``; the seed's manifests set
``AZ_TENANT_ID``, ``AZ_CLIENT_ID``, ``AZ_SERVER`` and ``AZ_DATABASE`` (and ``AZ_CLIENT_SECRET`` for
its local test). Both spellings are accepted; the webhook's win when both are present, since they
describe the identity the pod was actually federated with.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from swi_workload.errors import ConfigurationError

SQL_SCOPE = "https://database.windows.net/.default"
DEFAULT_DRIVER = "ODBC Driver 18 for SQL Server"
ENCRYPT_MODES = ("yes", "strict")


def _first(env: Mapping[str, str], *names: str) -> str | None:
    for name in names:
        value = env.get(name, "").strip()
        if value:
            return value
    return None


@dataclass(frozen=True)
class Backoff:
    """Retry schedule: ``first`` seconds, doubling, at most ``cap``, ``attempts`` tries in all."""

    attempts: int = 5
    first: float = 5.0
    cap: float = 60.0

    def delays(self) -> list[float]:
        return [min(self.first * 2**i, self.cap) for i in range(max(self.attempts - 1, 0))]


@dataclass(frozen=True)
class Settings:
    server: str
    database: str
    tenant_id: str | None = None
    client_id: str | None = None
    token_file: str | None = None
    client_secret: str | None = None
    authority_host: str | None = None
    encrypt: str = "yes"
    query: str | None = None  # AZ_QUERY: what the CLI runs when --query is not given
    driver: str = DEFAULT_DRIVER
    login_timeout_s: int = 30
    # Reconnect with a fresh token this long before the current one expires: the server checks a
    # token only at login, so a long-lived connection would otherwise outlive it unnoticed.
    recycle_margin_s: float = 300.0
    backoff: Backoff = field(default_factory=Backoff)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        env = os.environ if env is None else env
        server = _first(env, "AZ_SERVER", "AZURE_SQL_SERVER")
        database = _first(env, "AZ_DATABASE", "AZURE_SQL_DATABASE")
        missing = [n for n, v in (("AZ_SERVER", server), ("AZ_DATABASE", database)) if not v]
        if missing:
            raise ConfigurationError(
                f"{' and '.join(missing)} not set: give the SQL server as AZ_SERVER "
                "(for example tcp:myserver.database.windows.net,1433) and the database as "
                "AZ_DATABASE"
            )
        assert server is not None and database is not None
        settings = cls(
            server=server,
            database=database,
            tenant_id=_first(env, "AZURE_TENANT_ID", "AZ_TENANT_ID"),
            client_id=_first(env, "AZURE_CLIENT_ID", "AZ_CLIENT_ID"),
            token_file=_first(env, "AZURE_FEDERATED_TOKEN_FILE"),
            client_secret=_first(env, "AZURE_CLIENT_SECRET", "AZ_CLIENT_SECRET"),
            authority_host=_first(env, "AZURE_AUTHORITY_HOST"),
            encrypt=(_first(env, "AZ_ENCRYPT") or "yes").lower(),
            query=_first(env, "AZ_QUERY"),
        )
        settings = replace(settings, **overrides)  # type: ignore[arg-type]
        if settings.encrypt not in ENCRYPT_MODES:
            raise ConfigurationError(
                f"encrypt must be one of {', '.join(ENCRYPT_MODES)}, not {settings.encrypt!r}"
            )
        return settings

    def connection_string(self) -> str:
        # No UID/PWD/Authentication: the access token goes in SQL_COPT_SS_ACCESS_TOKEN.
        return (
            f"DRIVER={{{self.driver}}};SERVER={self.server};DATABASE={self.database};"
            f"Encrypt={self.encrypt};TrustServerCertificate=no"
        )
