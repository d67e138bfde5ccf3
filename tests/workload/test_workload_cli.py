"""``python -m swi_workload`` against the sandbox: the real driver, real tokens, real failures."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlbox import ADMIN, DEMO, OPERATOR, SqlBox, TestIssuer, federate, run_workload

FAST = ("--retries", "3", "--retry-delay", "0.2")


@pytest.fixture(scope="module")
def issuer(sqlbox_session: SqlBox) -> Iterator[TestIssuer]:
    stand_in = TestIssuer(sqlbox_session.state_dir)
    yield stand_in
    stand_in.close()


@pytest.fixture(scope="module")
def federated(
    sqlbox_session: SqlBox, issuer: TestIssuer, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    """The env a federated pod of SP-AZURESQL-USER gets from the webhook."""
    subject = "system:serviceaccount:workload-demo:workload-demo-service-account"
    federate(sqlbox_session, DEMO, issuer.url, subject)
    token_file = tmp_path_factory.mktemp("wi") / "azure-identity-token"
    token_file.write_text(issuer.token(subject))
    return {
        "AZURE_CLIENT_ID": DEMO.app_id,
        "AZURE_FEDERATED_TOKEN_FILE": str(token_file),
        "AZ_CLIENT_SECRET": "",
    }


@pytest.fixture
def admin_db(sqlbox: SqlBox) -> Iterator[Any]:
    conn = sqlbox.connect(sqlbox.token(OPERATOR))
    conn.execute("DROP USER IF EXISTS [sandbox-admin]")
    yield conn
    conn.execute("DROP USER IF EXISTS [sandbox-admin]")
    conn.close()


def _secret_env(app: Any) -> dict[str, str]:
    return {"AZ_CLIENT_ID": app.app_id, "AZ_CLIENT_SECRET": app.secret}


def test_federated_pod_prints_the_five_customers(sqlbox: SqlBox, federated: dict[str, str]) -> None:
    done = run_workload(sqlbox, **federated)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["customer_id", "first_name", "last_name", "active"]
    assert [line.split()[1] for line in lines[2:7]] == ["John", "Jane", "Alice", "Bob", "Emily"]
    assert lines[-1] == "(5 rows)"


def test_federated_pod_over_tds8_strict_as_json(sqlbox: SqlBox, federated: dict[str, str]) -> None:
    done = run_workload(sqlbox, "--encrypt", "strict", "--json", **federated)
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    assert body["rowcount"] == 5
    assert body["rows"][0] == {
        "customer_id": 1,
        "first_name": "John",
        "last_name": "Doe",
        "active": True,
    }


def test_parameterised_query(sqlbox: SqlBox, federated: dict[str, str]) -> None:
    done = run_workload(
        sqlbox,
        "--json",
        "-q",
        "SELECT first_name FROM dbo.Customer WHERE last_name = ?",
        "-p",
        "Brown",
        **federated,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["rows"] == [{"first_name": "Bob"}]


def test_seed_local_test_with_a_client_secret(sqlbox: SqlBox) -> None:
    done = run_workload(sqlbox, "--json")  # AZ_CLIENT_ID/AZ_CLIENT_SECRET from the sandbox env
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["rowcount"] == 5


def test_warm_queries_reuse_one_connection_and_one_token(
    sqlbox: SqlBox, federated: dict[str, str]
) -> None:
    done = run_workload(sqlbox, "--repeat", "5", "-v", **federated)
    assert done.returncode == 0, done.stderr
    assert "query 5:" in done.stderr
    assert "(connects=1, token requests=1, retries=0)" in done.stderr.splitlines()[4]


def test_no_token_file_exit_3(sqlbox: SqlBox) -> None:
    done = run_workload(sqlbox, AZURE_CLIENT_ID=DEMO.app_id, AZ_CLIENT_SECRET="")
    assert done.returncode == 3
    assert "AZURE_FEDERATED_TOKEN_FILE is not set: this pod is not federated" in done.stderr
    assert 'azure.workload.identity/use: "true"' in done.stderr


def test_no_matching_federated_credential_exit_4(
    sqlbox: SqlBox, issuer: TestIssuer, tmp_path: Path
) -> None:
    subject = "system:serviceaccount:other-ns:unfederated"
    token_file = tmp_path / "token"
    token_file.write_text(issuer.token(subject))
    done = run_workload(
        sqlbox,
        AZURE_CLIENT_ID=DEMO.app_id,
        AZ_CLIENT_SECRET="",
        AZURE_FEDERATED_TOKEN_FILE=str(token_file),
    )
    assert done.returncode == 4, done.stderr
    assert "(AADSTS70021)" in done.stderr
    assert f"issuer '{issuer.url}'" in done.stderr
    assert (
        f"subject '{subject}' (service account 'unfederated' in namespace 'other-ns')"
        in done.stderr
    )
    assert "audience 'api://AzureADTokenExchange'" in done.stderr


def test_no_database_user_exit_6_shows_the_create_user(sqlbox: SqlBox, admin_db: Any) -> None:
    done = run_workload(sqlbox, **_secret_env(ADMIN))
    assert done.returncode == 6, done.stderr
    assert "Login failed for user '<token-identified principal>'." in done.stderr
    # Entra's v1 tokens carry no display name: the client id names the user, the object id finds it.
    assert (
        f"CREATE USER [{ADMIN.app_id}] FROM EXTERNAL PROVIDER WITH OBJECT_ID = "
        f"'{ADMIN.sp_object_id}'" in done.stderr
    )


def test_expired_token_exit_7(sqlbox: SqlBox) -> None:
    url = f"{sqlbox.entra_url}/_sandbox/controls"
    requests.post(url, json={"clockSkewSeconds": -7200}, verify=str(sqlbox.ca), timeout=10)
    try:
        done = run_workload(sqlbox)
    finally:
        requests.post(url, json={"clockSkewSeconds": 0}, verify=str(sqlbox.ca), timeout=10)
    assert done.returncode == 7, done.stderr
    assert "Token is expired." in done.stderr


def test_role_missing_exit_8(sqlbox: SqlBox, admin_db: Any) -> None:
    sid = "0x" + uuid.UUID(ADMIN.app_id).bytes_le.hex()
    admin_db.execute(f"CREATE USER [sandbox-admin] WITH SID = {sid}, TYPE = E")
    done = run_workload(sqlbox, **_secret_env(ADMIN))
    assert done.returncode == 8, done.stderr
    assert "The SELECT permission was denied on the object 'Customer'" in done.stderr
    assert "ALTER ROLE db_datareader ADD MEMBER [sandbox-admin];" in done.stderr


def test_server_unreachable_exit_9(sqlbox: SqlBox) -> None:
    done = run_workload(
        sqlbox, "--retries", "1", "--login-timeout", "2", AZ_SERVER="tcp:localhost,1"
    )
    assert done.returncode == 9, done.stderr
    assert "cannot reach SQL server 'tcp:localhost,1'" in done.stderr


def test_40613_on_first_login_is_retried(sqlbox: SqlBox) -> None:
    sqlbox.ctl("fail-logins", "sandbox-sql", "--count", "1")
    done = run_workload(sqlbox, "-v", *FAST)
    assert done.returncode == 0, done.stderr
    assert "retries=1" in done.stderr
    assert done.stdout.splitlines()[-1] == "(5 rows)"


def test_40613_that_outlasts_the_retries_exit_10(sqlbox: SqlBox) -> None:
    sqlbox.ctl("fail-logins", "sandbox-sql", "--count", "3")
    try:
        done = run_workload(sqlbox, *FAST)
    finally:
        sqlbox.ctl("fail-logins", "sandbox-sql", "--count", "0")
    assert done.returncode == 10, done.stderr
    assert "stayed unavailable after 3 attempts" in done.stderr
    assert "(40613)" in done.stderr


def test_token_service_503_is_retried(sqlbox: SqlBox) -> None:
    # Discovery and token calls alike: the next two answers of the login surface are 503.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "sandbox.entra",
            "ctl",
            "--state-dir",
            str(sqlbox.state_dir),
            "fail",
            "login.*",
            "--status",
            "503",
            "--count",
            "2",
        ],
        check=True,
        env=sqlbox.process_env(),
        capture_output=True,
        timeout=30,
    )
    done = run_workload(sqlbox, "-v", *FAST)
    assert done.returncode == 0, done.stderr
    assert "token requests=1" in done.stderr  # retried inside the credential's pipeline


def test_query_error_exit_11_and_json_errors(sqlbox: SqlBox) -> None:
    done = run_workload(sqlbox, "--json", "-q", "SELECT * FROM dbo.Nope")
    assert done.returncode == 11
    assert json.loads(done.stdout) == {
        "error": "QueryFailed",
        "exitCode": 11,
        "message": "Invalid object name 'dbo.Nope'. (208)",
    }


@pytest.mark.parametrize("where", ["--logins", "--results"])
def test_connection_reset_mid_login_or_mid_result_is_retried(sqlbox: SqlBox, where: str) -> None:
    sqlbox.ctl("reset-connections", "sandbox-sql", where, "1")
    try:
        done = run_workload(sqlbox, "-v", *FAST)
    finally:
        sqlbox.ctl("reset-connections", "sandbox-sql")
    assert done.returncode == 0, done.stderr
    assert "retries=1" in done.stderr
    assert done.stdout.splitlines()[-1] == "(5 rows)"
    assert [e["kind"] for e in sqlbox.log()].count("reset") >= (where == "--results")
