"""Logins: tokens checked as Azure SQL checks them, failures with Azure SQL's numbers and texts."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import jwt
import pyodbc
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlbox import ADMIN, DEMO, TENANT, SqlBox

LOGIN_FAILED = "Login failed for user '<token-identified principal>'."


def _login_error(box: SqlBox, token: str, **kwargs: Any) -> str:
    with pytest.raises(pyodbc.Error) as caught:
        box.connect(token, **kwargs)
    return str(caught.value)


@pytest.fixture
def skewed_entra(sqlbox: SqlBox) -> Iterator[None]:
    """The Entra emulator's clock two hours behind: the tokens it issues are already expired."""
    url = f"{sqlbox.entra_url}/_sandbox/controls"
    requests.post(url, json={"clockSkewSeconds": -7200}, verify=str(sqlbox.ca), timeout=10)
    yield
    requests.post(url, json={"clockSkewSeconds": 0}, verify=str(sqlbox.ca), timeout=10)


def test_user_token_logs_in_as_its_contained_user(sqlbox: SqlBox) -> None:
    conn = sqlbox.connect(sqlbox.token(DEMO))
    try:
        row = conn.cursor().execute("SELECT USER_NAME(), SUSER_SNAME()").fetchone()
        assert tuple(row) == ("SP-AZURESQL-USER", f"{DEMO.app_id}@{TENANT}")
    finally:
        conn.close()


def test_expired_token_is_refused_with_the_real_text(sqlbox: SqlBox, skewed_entra: None) -> None:
    message = _login_error(sqlbox, sqlbox.token(DEMO))
    assert f"{LOGIN_FAILED} Token is expired. (18456)" in message
    assert "28000" in message


def test_token_for_another_audience_is_not_accepted(sqlbox: SqlBox) -> None:
    graph_token = sqlbox.token(DEMO, "https://graph.microsoft.com/.default")
    message = _login_error(sqlbox, graph_token)
    assert (
        f"{LOGIN_FAILED} The server is not currently configured to accept this token. (18456)"
    ) in message


def _forged(**extra: Any) -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = int(time.time())
    claims = {
        "aud": "https://database.windows.net/",
        "iss": f"https://sts.windows.net/{TENANT}/",
        "tid": TENANT,
        "oid": DEMO.sp_object_id,
        "appid": DEMO.app_id,
        "iat": now,
        "nbf": now,
        "exp": now + 3600,
        **extra,
    }
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": "not-an-entra-key"})


def test_token_signed_by_someone_else_is_not_accepted(sqlbox: SqlBox) -> None:
    assert "not currently configured to accept this token" in _login_error(sqlbox, _forged())


def test_a_login_spanning_several_packets_is_reassembled(sqlbox: SqlBox) -> None:
    # ~24 KB of UTF-16 token: LOGIN7 arrives in several TLS-wrapped packets, and is still judged.
    big = _forged(groups=[str(uuid.uuid4()) for _ in range(300)])
    assert len(big) > 12000
    assert "not currently configured to accept this token" in _login_error(sqlbox, big)


def test_valid_token_without_a_database_user_gets_18456(sqlbox: SqlBox, no_user: None) -> None:
    message = _login_error(sqlbox, sqlbox.token(ADMIN))
    assert message.endswith(f'[SQL Server]{LOGIN_FAILED} (18456) (SQLDriverConnect)")')


def test_sql_logins_are_refused(sqlbox: SqlBox) -> None:
    connection_string = (
        "DRIVER={ODBC Driver 18 for SQL Server};"
        f"SERVER={sqlbox.env['AZ_SERVER']};DATABASE=mydb;UID=sa;PWD=secret;Encrypt=yes"
    )
    with pytest.raises(pyodbc.Error) as caught:
        pyodbc.connect(connection_string, timeout=10)
    assert (
        "Login failed for user 'sa'. Reason: Azure Active Directory only authentication is "
        "enabled." in str(caught.value)
    )


def test_unknown_database_gets_4060(sqlbox: SqlBox) -> None:
    message = _login_error(sqlbox, sqlbox.token(DEMO), database="nosuchdb")
    assert 'Cannot open database "nosuchdb" requested by the login. The login failed.' in message


def test_injected_40613_fails_exactly_the_next_logins(sqlbox: SqlBox) -> None:
    sqlbox.ctl("fail-logins", "sandbox-sql", "--count", "1")
    message = _login_error(sqlbox, sqlbox.token(DEMO))
    assert (
        "Database 'mydb' on server 'sandbox-sql' is not currently available. Please retry "
        "the connection later." in message
    )
    assert "(40613)" in message
    sqlbox.connect(sqlbox.token(DEMO)).close()  # the next one works


def test_stopped_server_is_unreachable_until_started_on_the_same_port(sqlbox: SqlBox) -> None:
    port = sqlbox.info["servers"]["sandbox-sql"]["port"]
    sqlbox.ctl("stop", "sandbox-sql")
    try:
        message = _login_error(sqlbox, sqlbox.token(DEMO), timeout=2)
        assert "08001" in message or "Login timeout expired" in message
    finally:
        sqlbox.ctl("start", "sandbox-sql")
    status = sqlbox.admin("GET", "/servers")[0]
    assert status["running"] and status["port"] == port
    sqlbox.connect(sqlbox.token(DEMO)).close()


def test_query_log_records_logins_batches_and_failures(sqlbox: SqlBox) -> None:
    since = time.time()
    conn = sqlbox.connect(sqlbox.token(DEMO))
    conn.cursor().execute("SELECT 42").fetchall()
    conn.close()
    entries = [e for e in sqlbox.log() if e["ts"] >= since]
    kinds = [(e["kind"], e["user"]) for e in entries]
    assert ("login", "SP-AZURESQL-USER") in kinds
    assert any(e["kind"] == "batch" and e["text"] == "SELECT 42" for e in entries)
    text = sqlbox.ctl("log", "--server", "sandbox-sql").stdout
    assert "SELECT 42" in text


def test_connection_reset_mid_login_fails_exactly_that_login(sqlbox: SqlBox) -> None:
    sqlbox.ctl("reset-connections", "sandbox-sql", "--logins", "1")
    message = _login_error(sqlbox, sqlbox.token(DEMO))
    assert "08S01" in message or "08001" in message, message
    assert sqlbox.admin("GET", "/servers")[0]["reset_logins"] == 0
    sqlbox.connect(sqlbox.token(DEMO)).close()  # the next one works


def test_connection_reset_mid_result_breaks_that_query_only(sqlbox: SqlBox) -> None:
    conn = sqlbox.connect(sqlbox.token(DEMO))
    try:
        # A reply several packets long, so that half of it is rows.
        query = "SELECT * FROM Customer"
        assert len(conn.cursor().execute(query).fetchall()) == 5
        sqlbox.ctl("reset-connections", "sandbox-sql", "--results", "1")
        with pytest.raises(pyodbc.Error) as caught:
            conn.cursor().execute(query).fetchall()
        assert "08S01" in str(caught.value), caught.value
    finally:
        conn.close()
    log = [e for e in sqlbox.log() if e["kind"] == "reset"]
    assert log and log[-1]["text"] == "connection reset mid-result (injected)"
    again = sqlbox.connect(sqlbox.token(DEMO))
    try:
        assert len(again.cursor().execute(query).fetchall()) == 5
    finally:
        again.close()
