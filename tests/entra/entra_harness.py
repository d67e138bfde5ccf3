"""Test harness for the Entra emulator: the emulator as a subprocess, and an OIDC issuer.

``EntraService`` is a running emulator (started exactly as the launcher starts it: READY line,
``entra.json``) plus set-up helpers. ``OidcIssuer`` is a minimal HTTPS OpenID Connect issuer that
plays a cluster's OIDC issuer for jwt-bearer tests: it serves ``/.well-known/openid-configuration``
and ``/openid/v1/jwks`` like the Kubernetes API server, with a certificate from the sandbox CA, and
mints RS256 tokens the way TokenRequest does (``iss``, ``sub``, ``aud``, ``iat``, ``nbf``, ``exp``,
``kid`` header). Tests can sign with a key it does not publish (AADSTS7000272) or take discovery
down (AADSTS90061).
"""

from __future__ import annotations

import functools
import json
import signal
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from azure.identity import ClientSecretCredential
from cryptography.hazmat.primitives.asymmetric import rsa
from msgraph.graph_service_client import GraphServiceClient

from sandbox.entra.ctl import AdminClient
from sandbox.entra.state import Principal, World, load_world
from sandbox.pki import ensure_ca

REPO_ROOT = Path(__file__).resolve().parents[2]
WORLD_FILE = REPO_ROOT / "sandbox" / "world.yaml"
# ``graph_as(app)`` (conftest.py): msgraph-sdk signed in as one of the world's apps.
GraphFactory = Callable[[str], GraphServiceClient]
ADMIN_APP = "sandbox-admin"  # Application.ReadWrite.All; writer of every managed identity


@dataclass
class EntraService:
    """A running emulator and what tests need to reach it."""

    state_dir: Path
    url: str
    env: dict[str, str]
    world: World
    admin: AdminClient
    process: subprocess.Popen[str]

    @classmethod
    def attach(cls, state_dir: Path, process: subprocess.Popen[str]) -> EntraService:
        """Describe an emulator started in ``state_dir`` from its ``entra.json``."""
        info = json.loads((state_dir / "entra.json").read_text())
        return cls(
            state_dir=state_dir,
            url=info["url"],
            env=info["env"],
            world=load_world(WORLD_FILE),
            admin=AdminClient(info["url"], state_dir / "ca.crt"),
            process=process,
        )

    @property
    def ca(self) -> Path:
        return self.state_dir / "ca.crt"

    @functools.cached_property
    def http(self) -> requests.Session:
        """Plain HTTPS to this emulator, trusting its CA whatever the environment says.

        (A session-wide sandbox may point REQUESTS_CA_BUNDLE at another CA, and requests lets
        that variable override ``Session.verify``; hence ``trust_env = False``.)
        """
        session = requests.Session()
        session.trust_env = False
        session.verify = str(self.ca)
        return session

    @property
    def tenant_id(self) -> str:
        return self.env["AZURE_TENANT_ID"]

    @property
    def subscription_id(self) -> str:
        return self.env["SANDBOX_SUBSCRIPTION_ID"]

    @property
    def graph_url(self) -> str:
        return self.env["SANDBOX_GRAPH_URL"]

    def principal(self, name: str) -> Principal:
        return next(p for p in self.world.principals if p.name == name)

    def secret_credential(self, app: str, **overrides: Any) -> ClientSecretCredential:
        """azure-identity's ClientSecretCredential for ``app``, aimed at this emulator."""
        principal = self.principal(app)
        settings: dict[str, Any] = {
            "tenant_id": self.tenant_id,
            "client_id": principal.client_id,
            "client_secret": principal.secrets[0] if principal.secrets else "none",
            "authority": self.url,
            "disable_instance_discovery": True,
            "connection_verify": str(self.ca),
            **overrides,
        }
        return ClientSecretCredential(
            settings.pop("tenant_id"),
            settings.pop("client_id"),
            settings.pop("client_secret"),
            **settings,
        )

    def token(self, app: str = ADMIN_APP, resource: str = "https://graph.microsoft.com") -> str:
        """An access token by client secret over plain HTTP (for test set-up, not under test)."""
        principal = self.principal(app)
        response = self.http.post(
            f"{self.url}/{self.tenant_id}/oauth2/v2.0/token",
            data={
                "grant_type": "client_credentials",
                "client_id": principal.client_id,
                "client_secret": principal.secrets[0],
                "scope": f"{resource}/.default",
            },
            timeout=10,
        )
        response.raise_for_status()
        return str(response.json()["access_token"])

    def graph(
        self, method: str, path: str, body: dict[str, Any] | None = None, app: str = ADMIN_APP
    ) -> requests.Response:
        """A raw Graph call (set-up helper; the SDK tests use msgraph-sdk)."""
        return self.http.request(
            method,
            f"{self.graph_url}{path}",
            json=body,
            headers={"Authorization": f"Bearer {self.token(app)}"},
            timeout=10,
        )

    def add_app_credential(
        self, app: str, name: str, issuer: str, subject: str, audience: str
    ) -> dict[str, Any]:
        object_id = self.principal(app).app_object_id
        response = self.graph(
            "POST",
            f"/applications/{object_id}/federatedIdentityCredentials",
            {"name": name, "issuer": issuer, "subject": subject, "audiences": [audience]},
        )
        assert response.status_code == 201, response.text
        result: dict[str, Any] = response.json()
        return result


def start_emulator(state_dir: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    """Start ``serve`` as the launcher does; returns the process and its READY line."""
    process = subprocess.Popen(
        [sys.executable, "-m", "sandbox.entra", "serve", "--state-dir", str(state_dir), *extra],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    if not line.startswith("READY url="):
        process.kill()
        _, stderr = process.communicate(timeout=10)
        pytest.fail(f"the emulator did not start: {line!r} {stderr}", pytrace=False)
    return process, line


def stop_emulator(process: subprocess.Popen[str]) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout=15)


EXCHANGE_AUDIENCE = "api://AzureADTokenExchange"


class _Key:
    def __init__(self) -> None:
        self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = uuid.uuid4().hex

    def jwk(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(
            jwt.algorithms.RSAAlgorithm.to_jwk(self.private.public_key())
        )
        data.update(kid=self.kid, use="sig", alg="RS256")
        return data


class OidcIssuer:
    def __init__(self, server: ThreadingHTTPServer) -> None:
        self._server = server
        self.url = f"https://127.0.0.1:{server.server_address[1]}"
        self.key = _Key()
        self.unpublished = _Key()
        self.published = [self.key]
        self.discovery_up = True
        self.fetches: list[str] = []

    @classmethod
    @contextmanager
    def start(cls, state_dir: Path) -> Iterator[OidcIssuer]:
        ca = ensure_ca(state_dir)
        cert, key = ca.issue(state_dir, "test-issuer", ["localhost"], ["127.0.0.1"])
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        issuer = cls(server)
        server.issuer = issuer  # type: ignore[attr-defined]
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield issuer
        finally:
            server.shutdown()
            server.server_close()

    def restore(self) -> None:
        self.published = [self.key]
        self.discovery_up = True
        self.fetches.clear()

    def mint(
        self,
        subject: str,
        audience: str = EXCHANGE_AUDIENCE,
        *,
        lifetime: int = 3600,
        issued_at: float | None = None,
        issuer: str | None = None,
        unpublished_key: bool = False,
    ) -> str:
        now = int(time.time() if issued_at is None else issued_at)
        key = self.unpublished if unpublished_key else self.key
        claims = {
            "iss": issuer or self.url,
            "sub": subject,
            "aud": [audience],
            "iat": now,
            "nbf": now,
            "exp": now + lifetime,
        }
        return jwt.encode(claims, key.private, algorithm="RS256", headers={"kid": key.kid})

    def document(self, path: str) -> dict[str, Any] | None:
        self.fetches.append(path)
        if path == "/.well-known/openid-configuration" and self.discovery_up:
            return {
                "issuer": self.url,
                "jwks_uri": f"{self.url}/openid/v1/jwks",
                "response_types_supported": ["id_token"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"],
            }
        if path == "/openid/v1/jwks":
            return {"keys": [k.jwk() for k in self.published]}
        return None


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        issuer: OidcIssuer = self.server.issuer  # type: ignore[attr-defined]
        if self.path == "/openid/v1/jwks" and "jwk-set+json" not in self.headers.get("Accept", ""):
            # Like kube-apiserver, which answers 406 when application/jwk-set+json is not accepted.
            self.send_response(406)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        document = issuer.document(self.path)
        body = json.dumps(document or {"error": "not found"}).encode()
        self.send_response(200 if document is not None else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass
