"""Client code written as in the seed (and in Microsoft's docs) runs against the sandbox unchanged.

Only environment variables differ from Azure: the sandbox's ``HTTPS_PROXY`` or
``AZURE_AUTHORITY_HOST`` for Entra, ``SSL_CERT_FILE``/``REQUESTS_CA_BUNDLE`` for trust, ``AZ_*`` for
the server, and ``ODBCSYSINI`` so that "ODBC Driver 18 for SQL Server" resolves.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sqlbox import CUSTOMER_API, DEMO, SqlBox, TestIssuer, federate

CLIENTS = Path(__file__).parent / "clients"
FIVE = [f"Customer ID-->{i}" for i in range(1, 6)]


def _run(script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(CLIENTS / script)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def test_seed_client_secret_program_prints_five_customers(sqlbox: SqlBox) -> None:
    # ClientSecretCredential with its default authority reaches the emulator through the proxy.
    done = _run("seed_step3_app.txt", sqlbox.process_env())
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == FIVE


def test_documented_workload_identity_program_by_environment_alone(
    sqlbox: SqlBox, tmp_path: Path
) -> None:
    issuer = TestIssuer(sqlbox.state_dir)
    try:
        subject = "system:serviceaccount:workload-demo:workload-demo-service-account"
        federate(sqlbox, DEMO, issuer.url, subject)
        token_file = tmp_path / "azure-identity-token"
        token_file.write_text(issuer.token(subject))
        env = sqlbox.process_env(
            AZURE_CLIENT_ID=DEMO.app_id, AZURE_FEDERATED_TOKEN_FILE=str(token_file)
        )
        # No proxy: AZURE_AUTHORITY_HOST alone points WorkloadIdentityCredential at the emulator.
        for name in ("HTTPS_PROXY", "https_proxy"):
            env.pop(name, None)
        done = _run("documented_workload_identity_app.py", env)
    finally:
        issuer.close()
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == FIVE


def test_encrypt_strict_tds8(sqlbox: SqlBox) -> None:
    conn = sqlbox.connect(sqlbox.token(DEMO), encrypt="strict")
    try:
        rows = conn.cursor().execute("SELECT customer_id FROM dbo.Customer").fetchall()
    finally:
        conn.close()
    assert [r[0] for r in rows] == [1, 2, 3, 4, 5]


def test_strict_with_pinned_server_certificate(sqlbox: SqlBox) -> None:
    cert = sqlbox.state_dir / "azuresql" / "azuresql.crt"
    conn = sqlbox.connect(sqlbox.token(DEMO), encrypt=f"strict;ServerCertificate={cert}")
    try:
        assert conn.cursor().execute("SELECT COUNT(*) FROM Customer").fetchone()[0] == 5
    finally:
        conn.close()


def test_a_new_user_onboarded_by_the_admin_reads_through_the_seed_program(
    sqlbox: SqlBox, admin_db: object
) -> None:
    # The seed's Step 2 for a second app, then its Step 3 program logs in as that app.
    execute = admin_db.execute  # type: ignore[attr-defined]
    execute("DROP USER IF EXISTS [customer-api]")
    execute("CREATE USER [customer-api] FROM EXTERNAL PROVIDER")
    execute("ALTER ROLE db_datareader ADD MEMBER [customer-api]")
    try:
        # customer-api has no client secret: it logs in through federation.
        issuer = TestIssuer(sqlbox.state_dir)
        try:
            subject = "system:serviceaccount:shop:customer-api"
            federate(sqlbox, CUSTOMER_API, issuer.url, subject)
            token_file = sqlbox.state_dir / "customer-api-token"
            token_file.write_text(issuer.token(subject))
            done = _run(
                "documented_workload_identity_app.py",
                sqlbox.process_env(
                    AZURE_CLIENT_ID=CUSTOMER_API.app_id, AZURE_FEDERATED_TOKEN_FILE=str(token_file)
                ),
            )
        finally:
            issuer.close()
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == FIVE
    finally:
        execute("DROP USER IF EXISTS [customer-api]")
