"""ODBC Driver 18 acquiring its own Entra token: ``Authentication=ActiveDirectoryServicePrincipal``.

The driver asks for the MSAL/ADAL FEDAUTH workflow in LOGIN7; the emulator answers FEDAUTHINFO
(the SPN and ``https://login.windows.net/{tenant}``), the driver posts client credentials to that
STS's v1 endpoint (``/oauth2/token`` with ``resource=``) through ``HTTPS_PROXY``, which the
sandbox proxy tunnels to the Entra emulator, and sends the token back in a FEDAUTH_TOKEN message.

The driver fetches the token with the system's libcurl, which honours ``HTTPS_PROXY`` but trusts
only the system CA bundle (``SSL_CERT_FILE`` does not reach it). A real deployment trusts
login.windows.net's public CA there; here the program runs in a private mount namespace where
``/etc/ssl/certs/ca-certificates.crt`` is the system bundle plus the sandbox CA. The client program
is the unchanged connection-string code; nothing else on the machine sees that bundle.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from sqlbox import DEMO, REPO, TENANT, SqlBox

SYSTEM_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")

# The client: a plain pyodbc program with the documented connection string, nothing sandbox-aware.
PROGRAM = """
import os, sys, pyodbc
conn = pyodbc.connect(
    "DRIVER={ODBC Driver 18 for SQL Server};"
    f"SERVER={os.environ['AZ_SERVER']};DATABASE={os.environ['AZ_DATABASE']};Encrypt=yes;"
    "Authentication=ActiveDirectoryServicePrincipal;"
    f"UID={os.environ['AZ_CLIENT_ID']};PWD={os.environ['AZ_CLIENT_SECRET']}",
    timeout=int(os.environ.get("LOGIN_TIMEOUT", "30")),
)
print(*conn.cursor().execute("SELECT USER_NAME(), SUSER_SNAME()").fetchone(), sep="|")
print(conn.cursor().execute("SELECT COUNT(*) FROM Customer").fetchone()[0])
"""


def _run_trusting_sandbox_ca(
    box: SqlBox, tmp_path: Path, **env: str
) -> subprocess.CompletedProcess[str]:
    unshare = shutil.which("unshare")
    assert unshare, "the test needs util-linux's unshare (a private mount namespace for the CA)"
    assert SYSTEM_BUNDLE.exists(), f"no system CA bundle at {SYSTEM_BUNDLE} (ca-certificates)"
    bundle = tmp_path / "ca-certificates.crt"
    bundle.write_text(SYSTEM_BUNDLE.read_text() + box.ca.read_text())
    script = tmp_path / "client.py"
    script.write_text(PROGRAM)
    # Root gets a plain mount namespace; anyone else an unprivileged user namespace with one.
    namespace = ["--mount"] if os.geteuid() == 0 else ["--map-root-user", "--mount"]
    shell = f'mount --bind "{bundle}" {SYSTEM_BUNDLE} && exec "{sys.executable}" "{script}"'
    return subprocess.run(
        [unshare, *namespace, "sh", "-c", shell],
        capture_output=True,
        text=True,
        timeout=90,
        env=box.process_env(**env),
        cwd=REPO,
        check=False,
    )


def test_service_principal_login_with_the_driver_fetching_its_token(
    sqlbox: SqlBox, tmp_path: Path
) -> None:
    sqlbox.admin("DELETE", "/log")
    done = _run_trusting_sandbox_ca(sqlbox, tmp_path)
    assert done.returncode == 0, done.stderr
    who, count = done.stdout.split()
    assert who == f"SP-AZURESQL-USER|{DEMO.app_id}@{TENANT}"
    assert count == "5"
    logins = [e for e in sqlbox.log() if e["kind"] == "login"]
    assert logins and logins[0]["user"] == "SP-AZURESQL-USER", logins


def test_a_wrong_secret_ends_in_the_drivers_login_timeout(sqlbox: SqlBox, tmp_path: Path) -> None:
    # What the real driver does too (mkleehammer/pyodbc#1365, against Microsoft Fabric): Entra's
    # 401 leaves it without a token, and pyodbc reports the login timeout.
    sqlbox.entra_admin("DELETE", "requests")
    done = _run_trusting_sandbox_ca(
        sqlbox, tmp_path, AZ_CLIENT_SECRET="not-the-secret", LOGIN_TIMEOUT="5"
    )
    assert done.returncode != 0
    assert "HYT00" in done.stderr and "Login timeout expired" in done.stderr, done.stderr
    log = sqlbox.entra_admin("GET", "requests?route=login.token")["log"]
    assert [r["status"] for r in log] == [401]
