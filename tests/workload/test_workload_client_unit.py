"""The workload library's contracts, with fakes for the driver, the credential and the clock."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyodbc
import pytest
from azure.core.credentials import AccessToken
from azure.core.exceptions import ClientAuthenticationError
from swi_workload import (
    Backoff,
    ConfigurationError,
    DatabaseUnavailableError,
    DatabaseUserMissingError,
    NoMatchingFederatedCredentialError,
    NotFederatedError,
    PermissionDeniedError,
    ServerUnreachableError,
    Settings,
    SqlClient,
    TokenRejectedError,
    TokenServiceError,
    TokenSource,
    token_struct,
)
from swi_workload.errors import EXIT_CODES, parse_odbc_error

SERVER = "tcp:example.database.windows.net,1433"


def _jwt(claims: dict[str, Any]) -> str:
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")

    return f"{part({'alg': 'RS256'})}.{part(claims)}.sig"


def _odbc(number: int, text: str, state: str = "42000") -> pyodbc.Error:
    return pyodbc.Error(
        state,
        f"[{state}] [Microsoft][ODBC Driver 18 for SQL Server][SQL Server]"
        f"{text} ({number}) (SQLDriverConnect)",
    )


@dataclass
class Clock:
    now: float = 1_000_000.0
    slept: list[float] = field(default_factory=list)

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@dataclass
class FakeCredential:
    clock: Clock
    lifetime: float = 3600.0
    failures: list[Exception] = field(default_factory=list)
    calls: int = 0
    issued: int = 0
    _cached: AccessToken | None = None

    def get_token(self, *scopes: str, **_: Any) -> AccessToken:
        assert scopes == ("https://database.windows.net/.default",)
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        # Like azure-identity: cached until five minutes before expiry.
        if self._cached is None or self._cached.expires_on - 300 <= self.clock.now:
            self.issued += 1
            token = _jwt(
                {
                    "oid": "oid-1",
                    "appid": "app-1",
                    "app_displayname": "customer-api",
                    "n": self.issued,
                }
            )
            self._cached = AccessToken(token, int(self.clock.now + self.lifetime))
        return self._cached


@dataclass
class FakeCursor:
    owner: FakeConnection
    description: list[tuple[str, type]] | None = None
    rowcount: int = -1
    _rows: list[tuple[Any, ...]] = field(default_factory=list)
    closed: bool = False

    def execute(self, sql: str, *params: Any) -> FakeCursor:
        if any(not c.closed for c in self.owner.cursors if c is not self):
            raise AssertionError("Connection is busy with results for another command")
        self.owner.executed.append((sql, params))
        if self.owner.query_failures:
            raise self.owner.query_failures.pop(0)
        if sql == "SELECT USER_NAME()":
            self.description, self._rows = [("", str)], [("customer-api",)]
        else:
            self.description, self._rows = [("id", int)], [(1,), (2,)]
        self.rowcount = len(self._rows)
        return self

    def fetchall(self) -> list[tuple[Any, ...]]:
        return self._rows

    def fetchone(self) -> tuple[Any, ...] | None:
        return self._rows[0] if self._rows else None

    def close(self) -> None:
        self.closed = True


@dataclass
class FakeConnection:
    token: bytes
    query_failures: list[Exception]
    executed: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)
    closed: bool = False
    cursors: list[FakeCursor] = field(default_factory=list)

    def cursor(self) -> FakeCursor:
        # Like the ODBC driver without MARS: one open statement per connection.
        self.cursors.append(FakeCursor(self))
        return self.cursors[-1]

    def close(self) -> None:
        self.closed = True


@dataclass
class FakeDriver:
    login_failures: list[Exception] = field(default_factory=list)
    query_failures: list[Exception] = field(default_factory=list)
    connections: list[FakeConnection] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, connection_string: str, **kwargs: Any) -> FakeConnection:
        self.kwargs.append({"connection_string": connection_string, **kwargs})
        if self.login_failures:
            raise self.login_failures.pop(0)
        conn = FakeConnection(kwargs["attrs_before"][1256], self.query_failures)
        self.connections.append(conn)
        return conn


def _client(
    driver: FakeDriver, credential: FakeCredential, clock: Clock, **settings: Any
) -> SqlClient:
    config = Settings(
        server=SERVER,
        database="mydb",
        client_id="app-1",
        backoff=Backoff(attempts=4, first=5.0, cap=12.0),
        **settings,
    )
    tokens = TokenSource(config, credential)
    return SqlClient(config, tokens=tokens, connect=driver, clock=clock, sleep=clock.sleep)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_token_struct_is_length_prefixed_utf16() -> None:
    assert token_struct("ab") == b"\x04\x00\x00\x00a\x00b\x00"


def test_one_token_per_physical_connection_never_per_query(clock: Clock) -> None:
    driver, credential = FakeDriver(), FakeCredential(clock)
    client = _client(driver, credential, clock)
    for _ in range(50):
        assert client.query("SELECT id FROM t WHERE x = ?", 1).rows == [(1,), (2,)]
    assert len(driver.connections) == 1
    assert credential.calls == 1
    assert client.stats.token_requests == 1 and client.stats.queries == 50
    kwargs = driver.kwargs[0]
    assert (
        "UID" not in kwargs["connection_string"]
        and "Authentication" not in kwargs["connection_string"]
    )
    assert kwargs["autocommit"] is True and kwargs["timeout"] == 30


def test_each_query_closes_its_cursor_before_the_next_can_start(clock: Clock) -> None:
    """Found by bench/onboarding.py: threads sharing a client got "Connection is busy with
    results for another command" when a finished query's cursor was still open."""
    driver, credential = FakeDriver(), FakeCredential(clock)
    client = _client(driver, credential, clock)
    kept = [client.query("SELECT id FROM t") for _ in range(3)]  # results outlive their cursors
    assert [r.rows for r in kept] == [[(1,), (2,)]] * 3
    assert all(c.closed for c in driver.connections[0].cursors)


def test_connection_is_recycled_before_the_token_expires(clock: Clock) -> None:
    driver, credential = FakeDriver(), FakeCredential(clock, lifetime=3600)
    client = _client(driver, credential, clock, recycle_margin_s=300)
    client.query("SELECT 1")
    clock.now += 3600 - 301
    client.query("SELECT 1")
    assert len(driver.connections) == 1  # still inside the token's lifetime minus the margin
    clock.now += 2
    client.query("SELECT 1")
    assert len(driver.connections) == 2
    assert driver.connections[0].closed
    assert driver.connections[0].token != driver.connections[1].token  # a fresh token
    assert credential.issued == 2


def test_transient_login_errors_are_retried_with_capped_backoff(clock: Clock) -> None:
    busy = _odbc(40613, "Database 'mydb' on server 's' is not currently available.", "08004")
    driver = FakeDriver(login_failures=[busy, busy, busy])
    client = _client(driver, FakeCredential(clock), clock)
    assert client.query("SELECT 1").rowcount == 2
    assert clock.slept == [5.0, 10.0, 12.0]  # 5 s first, doubling, capped
    assert client.stats.retries == 3


def test_transient_errors_that_outlast_the_retries(clock: Clock) -> None:
    busy = _odbc(40613, "Database 'mydb' on server 's' is not currently available.", "08004")
    client = _client(FakeDriver(login_failures=[busy] * 10), FakeCredential(clock), clock)
    with pytest.raises(DatabaseUnavailableError, match="after 4 attempts"):
        client.query("SELECT 1")


def test_a_broken_connection_is_replaced_and_the_query_rerun(clock: Clock) -> None:
    broken = pyodbc.Error(
        "08S01",
        "[08S01] [Microsoft][ODBC Driver 18 for SQL Server]"
        "Communication link failure (0) (SQLExecDirectW)",
    )
    driver = FakeDriver(query_failures=[broken])
    client = _client(driver, FakeCredential(clock), clock)
    assert client.query("SELECT 1").rows == [(1,), (2,)]
    assert len(driver.connections) == 2


def test_unreachable_server(clock: Clock) -> None:
    timeout = pyodbc.Error(
        "HYT00",
        "[HYT00] [Microsoft][ODBC Driver 18 for SQL Server]Login "
        "timeout expired (0) (SQLDriverConnect)",
    )
    client = _client(FakeDriver(login_failures=[timeout] * 4), FakeCredential(clock), clock)
    with pytest.raises(ServerUnreachableError, match="cannot reach SQL server") as caught:
        client.query("SELECT 1")
    assert caught.value.exit_code == 9


def test_missing_database_user_shows_the_create_user_to_run(clock: Clock) -> None:
    failed = _odbc(18456, "Login failed for user '<token-identified principal>'.", "28000")
    client = _client(FakeDriver(login_failures=[failed]), FakeCredential(clock), clock)
    with pytest.raises(DatabaseUserMissingError) as caught:
        client.query("SELECT 1")
    assert "CREATE USER [customer-api] FROM EXTERNAL PROVIDER WITH OBJECT_ID = 'oid-1'" in str(
        caught.value
    )
    assert "ALTER ROLE db_datareader ADD MEMBER [customer-api]" in str(caught.value)
    assert caught.value.exit_code == 6
    assert clock.slept == []  # not transient: no retry


@pytest.mark.parametrize(
    "reason", ["Token is expired.", "The server is not currently configured to accept this token."]
)
def test_rejected_tokens(clock: Clock, reason: str) -> None:
    failed = _odbc(
        18456, f"Login failed for user '<token-identified principal>'. {reason}", "28000"
    )
    client = _client(FakeDriver(login_failures=[failed]), FakeCredential(clock), clock)
    with pytest.raises(TokenRejectedError, match=reason.split(".", maxsplit=1)[0]) as caught:
        client.query("SELECT 1")
    assert caught.value.exit_code == 7


def test_permission_denied_names_the_role_to_grant(clock: Clock) -> None:
    denied = _odbc(
        229,
        "The SELECT permission was denied on the object 'Customer', database 'mydb', schema 'dbo'.",
    )
    client = _client(FakeDriver(query_failures=[denied]), FakeCredential(clock), clock)
    with pytest.raises(PermissionDeniedError) as caught:
        client.query("SELECT * FROM Customer")
    assert "ALTER ROLE db_datareader ADD MEMBER [customer-api];" in str(caught.value)


def test_token_retries_belong_to_the_credential_pipeline(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # One retry layer: azure-core's policy inside the credential (below MSAL's failure cache).
    import azure.identity

    seen: dict[str, Any] = {}
    monkeypatch.setattr(
        azure.identity, "WorkloadIdentityCredential", lambda **kwargs: seen.update(kwargs)
    )
    token_file = tmp_path / "token"
    token_file.write_text("x")
    from swi_workload.tokens import build_credential

    build_credential(
        Settings(
            server=SERVER,
            database="mydb",
            client_id="c",
            tenant_id="t",
            token_file=str(token_file),
            backoff=Backoff(4, 5.0, 60.0),
        )
    )
    assert (seen["retry_total"], seen["retry_backoff_factor"], seen["retry_backoff_max"]) == (
        3,
        5.0,
        60.0,
    )


def test_token_service_5xx_left_after_the_retries_is_exit_5(clock: Clock) -> None:
    unavailable = ClientAuthenticationError("AADSTS90033: ServiceUnavailable")
    unavailable.status_code = 503
    client = _client(FakeDriver(), FakeCredential(clock, failures=[unavailable]), clock)
    with pytest.raises(TokenServiceError, match=r"\(HTTP 503\), after 4 attempts") as caught:
        client.query("SELECT 1")
    assert caught.value.exit_code == 5
    assert clock.slept == []  # no second retry loop on top of the credential's


def test_token_service_4xx_is_final(clock: Clock) -> None:
    bad = ClientAuthenticationError("AADSTS7000215: Invalid client secret provided.")
    bad.status_code = 401
    client = _client(FakeDriver(), FakeCredential(clock, failures=[bad]), clock)
    with pytest.raises(TokenServiceError, match="AADSTS7000215") as caught:
        client.query("SELECT 1")
    assert caught.value.exit_code == 5 and clock.slept == []


def test_no_matching_federated_credential_explains_the_token(clock: Clock, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(
        _jwt(
            {
                "iss": "https://oidc.example/abc/",
                "aud": ["api://AzureADTokenExchange"],
                "sub": "system:serviceaccount:shop:api",
            }
        )
    )
    error = ClientAuthenticationError("AADSTS70021: No matching federated identity record found")
    error.status_code = 400
    config = Settings(server=SERVER, database="mydb", client_id="app-1", token_file=str(token_file))
    source = TokenSource(config, FakeCredential(clock, failures=[error]))
    with pytest.raises(NoMatchingFederatedCredentialError) as caught:
        source.get()
    message = str(caught.value)
    assert "issuer 'https://oidc.example/abc/'" in message
    assert (
        "subject 'system:serviceaccount:shop:api' (service account 'api' in namespace "
        "'shop')" in message
    )
    assert "audience 'api://AzureADTokenExchange'" in message
    assert caught.value.exit_code == 4


def test_settings_accept_the_webhook_and_the_seed_variables() -> None:
    webhook = Settings.from_env(
        {
            "AZURE_CLIENT_ID": "c",
            "AZURE_TENANT_ID": "t",
            "AZURE_FEDERATED_TOKEN_FILE": "/f",
            "AZ_CLIENT_ID": "seed",
            "AZ_SERVER": SERVER,
            "AZ_DATABASE": "mydb",
        }
    )
    assert (webhook.client_id, webhook.tenant_id, webhook.token_file) == ("c", "t", "/f")
    seed = Settings.from_env(
        {"AZ_TENANT_ID": "t2", "AZ_CLIENT_ID": "c2", "AZ_SERVER": SERVER, "AZ_DATABASE": "mydb"}
    )
    assert (seed.client_id, seed.tenant_id) == ("c2", "t2")
    with pytest.raises(ConfigurationError, match="AZ_SERVER and AZ_DATABASE not set"):
        Settings.from_env({})


def test_no_token_file_means_not_federated(tmp_path: Path) -> None:
    from swi_workload.tokens import build_credential

    with pytest.raises(NotFederatedError, match="AZURE_FEDERATED_TOKEN_FILE is not set"):
        build_credential(Settings(server=SERVER, database="mydb"))
    with pytest.raises(NotFederatedError, match="does not exist"):
        build_credential(
            Settings(server=SERVER, database="mydb", token_file=str(tmp_path / "missing"))
        )


def test_exit_codes_are_distinct() -> None:
    assert len(set(EXIT_CODES.values())) == len(EXIT_CODES)


def test_parse_odbc_error() -> None:
    failure = parse_odbc_error(_odbc(229, "The SELECT permission was denied."))
    assert (failure.sqlstate, failure.number, failure.message) == (
        "42000",
        229,
        "The SELECT permission was denied.",
    )
