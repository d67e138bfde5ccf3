"""A small sandbox for the SQL and workload suites: Entra + proxy + Azure SQL, no control plane.

The shared ``sandbox`` fixture (tests/conftest.py) also runs the Kubernetes control plane, which
costs minutes to build; these suites need only the Entra emulator, the proxy and the SQL emulator,
so they start exactly those through the same launcher ``python -m sandbox up`` uses (real service
contracts, real processes) in a temporary state directory shared by both suites.

``TestIssuer`` plays a cluster's OIDC issuer (discovery + JWKS over HTTPS with a sandbox-CA
certificate) so WorkloadIdentityCredential flows can be tested here; the test against a real
Kubernetes TokenRequest is tests/workload/test_workload_controlplane.py (shared fixture).
"""

from __future__ import annotations

import json
import os
import ssl
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import rsa

from sandbox import launcher
from sandbox.demo import SEED_QUERY
from sandbox.pki import ensure_ca

REPO = Path(__file__).resolve().parents[2]
TENANT = "8a1f3c2e-5b7d-4e90-a1c3-0f2e4d6b8a10"
OTHER_TENANT = "2c4e6a8b-1d3f-4a5b-9c7d-e1f2a3b4c5d6"
SQL_SCOPE = "https://database.windows.net/.default"
EXCHANGE_AUDIENCE = "api://AzureADTokenExchange"


@dataclass(frozen=True)
class App:
    name: str
    app_id: str
    object_id: str
    sp_object_id: str
    secret: str | None = None


OPERATOR = App(
    "sql-workload-identity-operator",
    "5e0c1d9a-7b3f-4c2e-9a1d-000000000001",
    "5e0c1d9a-7b3f-4c2e-9a1d-0000000000a1",
    "5e0c1d9a-7b3f-4c2e-9a1d-0000000000b1",
    "sandbox-operator-secret",
)
DEMO = App(
    "SP-AZURESQL-USER",
    "5e0c1d9a-7b3f-4c2e-9a1d-000000000002",
    "5e0c1d9a-7b3f-4c2e-9a1d-0000000000a2",
    "5e0c1d9a-7b3f-4c2e-9a1d-0000000000b2",
    "sandbox-demo-secret",
)
CUSTOMER_API = App(
    "customer-api",
    "5e0c1d9a-7b3f-4c2e-9a1d-000000000003",
    "5e0c1d9a-7b3f-4c2e-9a1d-0000000000a3",
    "5e0c1d9a-7b3f-4c2e-9a1d-0000000000b3",
)
ADMIN = App(
    "sandbox-admin",
    "5e0c1d9a-7b3f-4c2e-9a1d-000000000006",
    "5e0c1d9a-7b3f-4c2e-9a1d-0000000000a6",
    "5e0c1d9a-7b3f-4c2e-9a1d-0000000000b6",
    "sandbox-admin-secret",
)

COMPONENTS = (launcher.ENTRA, launcher.PROXY, launcher.AZURESQL)


@dataclass
class SqlBox:
    state_dir: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def ca(self) -> Path:
        return self.state_dir / "ca.crt"

    @property
    def entra_url(self) -> str:
        return self.env["SANDBOX_ENTRA_URL"]

    @property
    def info(self) -> dict[str, Any]:
        return dict(json.loads((self.state_dir / "azuresql.json").read_text()))

    @property
    def admin_url(self) -> str:
        return str(self.info["admin_url"])

    def token(self, app: App, scope: str = SQL_SCOPE, tenant: str = TENANT) -> str:
        """An access token straight from the Entra emulator's token endpoint."""
        response = requests.post(
            f"{self.entra_url}/{tenant}/oauth2/v2.0/token",
            data={
                "grant_type": "client_credentials",
                "client_id": app.app_id,
                "client_secret": app.secret,
                "scope": scope,
            },
            verify=str(self.ca),
            timeout=10,
        )
        response.raise_for_status()
        return str(response.json()["access_token"])

    def connect(
        self,
        token: str,
        *,
        encrypt: str = "yes",
        autocommit: bool = True,
        database: str | None = None,
        timeout: int = 10,
    ) -> Any:
        import pyodbc

        raw = token.encode("utf-16-le")
        attrs = {1256: struct.pack(f"<I{len(raw)}s", len(raw), raw)}
        connection_string = (
            "DRIVER={ODBC Driver 18 for SQL Server};"
            f"SERVER={self.env['AZ_SERVER']};DATABASE={database or self.env['AZ_DATABASE']};"
            f"Encrypt={encrypt};TrustServerCertificate=no"
        )
        # The login timeout is SQL_ATTR_LOGIN_TIMEOUT (pyodbc's timeout=); driver 18 ignores the
        # ADO.NET-style "Connection Timeout" keyword of the seed's connection string (15 s).
        return pyodbc.connect(
            connection_string, attrs_before=attrs, autocommit=autocommit, timeout=timeout
        )

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "sandbox.azuresql",
                "ctl",
                "--state-dir",
                str(self.state_dir),
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
            cwd=REPO,
        )

    def admin(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = requests.request(method, self.admin_url + path, json=body, timeout=10)
        response.raise_for_status()
        return response.json()

    def entra_admin(self, method: str, path: str) -> Any:
        """The Entra emulator's admin API (``/_sandbox/PATH``)."""
        response = requests.request(
            method, f"{self.entra_url}/_sandbox/{path}", verify=str(self.ca), timeout=10
        )
        response.raise_for_status()
        return response.json()

    def log(self) -> list[dict[str, Any]]:
        return list(self.admin("GET", "/log"))

    def process_env(self, **extra: str) -> dict[str, str]:
        """os.environ + the sandbox's env, without the caller's own Azure settings."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "AZ_", "ODBC"))}
        env.update(self.env)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "workload")])
        env.update(extra)
        return env

    def graph(self, method: str, path: str, app: App = OPERATOR, **kwargs: Any) -> Any:
        token = self.token(app, "https://graph.microsoft.com/.default")
        return requests.request(
            method,
            f"{self.entra_url}/v1.0/{path}",
            timeout=10,
            headers={"Authorization": f"Bearer {token}"},
            verify=str(self.ca),
            **kwargs,
        )


_box: SqlBox | None = None
_users = 0


def acquire(tmp_path_factory: pytest.TempPathFactory) -> SqlBox:
    """Start the components once per test process (both suites share them)."""
    global _box, _users
    if _box is None:
        state_dir = tmp_path_factory.mktemp("sqlbox")
        try:
            launcher.up(state_dir, COMPONENTS, timeout=60)
        except launcher.SandboxError as exc:
            launcher.down(state_dir)
            pytest.fail(f"the SQL sandbox did not start: {exc}", pytrace=False)
        _box = SqlBox(state_dir, launcher.environment(state_dir))
    _users += 1
    return _box


def release() -> None:
    global _box, _users
    _users -= 1
    if _users == 0 and _box is not None:
        launcher.down(_box.state_dir)
        _box = None


@pytest.fixture(scope="session")
def sqlbox_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SqlBox]:
    """The running components, shared by the whole test process (environment untouched)."""
    box = acquire(tmp_path_factory)
    try:
        yield box
    finally:
        release()


@pytest.fixture
def sqlbox(sqlbox_session: SqlBox, monkeypatch: pytest.MonkeyPatch) -> SqlBox:
    """The sandbox, with its environment applied to this process for one test only.

    In-process pyodbc needs ODBCSYSINI and SSL_CERT_FILE as a user's shell would have them; they
    are set per test (not per session) so that suites using the shared ``sandbox`` fixture, whose
    CA and ports differ, never see this sandbox's values.
    """
    for name, value in sqlbox_session.env.items():
        monkeypatch.setenv(name, value)
    return sqlbox_session


# --- a stand-in cluster issuer ---------------------------------------------------------


class TestIssuer:
    """An OIDC issuer on loopback that signs service-account-like tokens (RS256)."""

    __test__ = False  # not a test class

    def __init__(self, state_dir: Path) -> None:
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = uuid.uuid4().hex[:16]
        cert, key = ensure_ca(state_dir).issue(state_dir, "test-issuer", dns_names=["localhost"])
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self._key.public_key()))
        jwk.update({"kid": self.kid, "use": "sig", "alg": "RS256"})
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/.well-known/openid-configuration":
                    body: dict[str, Any] = {
                        "issuer": issuer.url,
                        "jwks_uri": f"{issuer.url}/openid/v1/jwks",
                        "response_types_supported": ["id_token"],
                        "subject_types_supported": ["public"],
                        "id_token_signing_alg_values_supported": ["RS256"],
                    }
                elif self.path == "/openid/v1/jwks":
                    body = {"keys": [jwk]}
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.url = f"https://localhost:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def token(
        self,
        subject: str,
        audience: str = EXCHANGE_AUDIENCE,
        ttl: int = 3600,
        now: float | None = None,
    ) -> str:
        """A signed token issued at ``now`` (default: this moment)."""
        now = int(time.time() if now is None else now)
        claims = {
            "iss": self.url,
            "sub": subject,
            "aud": [audience],
            "iat": now,
            "nbf": now,
            "exp": now + ttl,
        }
        return jwt.encode(claims, self._key, algorithm="RS256", headers={"kid": self.kid})

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def federate(box: SqlBox, app: App, issuer: str, subject: str) -> str:
    """Create a federated identity credential on ``app`` through Graph, as the operator would."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    response = box.graph(
        "POST",
        f"applications/{app.object_id}/federatedIdentityCredentials",
        json={"name": name, "issuer": issuer, "subject": subject, "audiences": [EXCHANGE_AUDIENCE]},
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def run_workload(box: SqlBox, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m swi_workload ARGS`` with the sandbox's environment plus ``env``; the query is
    the demo's (the seed's table) unless ``env`` sets ``AZ_QUERY`` (or the args ``--query``)."""
    return subprocess.run(
        [sys.executable, "-m", "swi_workload", *args],
        capture_output=True,
        text=True,
        timeout=90,
        env=box.process_env(**{"AZ_QUERY": SEED_QUERY, **env}),
        cwd=REPO,
        check=False,
    )
