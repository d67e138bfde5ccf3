"""Access tokens the emulator issues, and the check Graph and ARM apply to them.

The emulator signs v1.0 access tokens (RS256) with one RSA key kept in the state directory, so a
restart keeps the same key id and the Azure SQL emulator's cached JWKS stays valid. The public key
is published at ``/{tenant}/discovery/v2.0/keys``, ``/{tenant}/discovery/keys`` and
``/common/discovery/keys`` (see login.py). Claims follow Entra's v1 app-only tokens: ``aud`` is the
resource asked for in ``scope`` (``https://graph.microsoft.com``, ``https://management.azure.com/``,
``https://database.windows.net/``), ``iss`` is ``https://sts.windows.net/{tid}/``, ``oid``/``sub``
the service principal object id, ``appid`` the client id, ``roles`` the Graph application
permissions when the audience is Graph.

``authenticate`` is what Graph and ARM call on each request: it verifies the bearer token with the
emulator's clock (so injected skew applies) and resolves the calling service principal.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from sandbox.entra.faults import Clock
from sandbox.entra.state import Directory, Principal

ACCESS_TOKEN_SECONDS = 3599
_BACKDATE_SECONDS = 300  # Entra backdates iat/nbf by five minutes

GRAPH_APP_ID = "00000003-0000-0000-c000-000000000000"
ARM_APP_ID = "797f4846-ba00-4fd7-ba43-dac1f8f63013"
SQL_APP_ID = "022907d3-0f1b-48f7-badc-1ba6abab6d66"

# Requested resource (no trailing slash, lower case) -> the ``aud`` Entra puts in a v1 token.
RESOURCE_AUDIENCES: dict[str, str] = {
    "https://graph.microsoft.com": "https://graph.microsoft.com",
    GRAPH_APP_ID: "https://graph.microsoft.com",
    "https://management.azure.com": "https://management.azure.com/",
    "https://management.core.windows.net": "https://management.core.windows.net/",
    ARM_APP_ID: "https://management.core.windows.net/",
    "https://database.windows.net": "https://database.windows.net/",
    SQL_APP_ID: "https://database.windows.net/",
}
GRAPH_AUDIENCES = frozenset(
    {"https://graph.microsoft.com", "https://graph.microsoft.com/", GRAPH_APP_ID}
)
ARM_AUDIENCES = frozenset(
    {
        "https://management.azure.com",
        "https://management.azure.com/",
        "https://management.core.windows.net",
        "https://management.core.windows.net/",
        ARM_APP_ID,
    }
)


def sts_issuer(tenant_id: str) -> str:
    return f"https://sts.windows.net/{tenant_id}/"


def _b64url_uint(value: int) -> str:
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class SigningKey:
    """The emulator's token-signing key; ``kid`` is its RFC 7638 thumbprint."""

    def __init__(self, key: rsa.RSAPrivateKey) -> None:
        self.key = key
        numbers = key.public_key().public_numbers()
        self._n, self._e = _b64url_uint(numbers.n), _b64url_uint(numbers.e)
        canonical = json.dumps({"e": self._e, "kty": "RSA", "n": self._n}, separators=(",", ":"))
        digest = hashlib.sha256(canonical.encode()).digest()
        self.kid = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    @classmethod
    def load_or_create(cls, path: Path) -> SigningKey:
        if path.exists():
            loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(loaded, rsa.RSAPrivateKey):
                raise ValueError(f"{path}: the token-signing key must be RSA; delete it")
            return cls(loaded)
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(pem)
        tmp.chmod(0o600)
        tmp.replace(path)
        return cls(key)

    def jwk(self) -> dict[str, Any]:
        return {
            "kty": "RSA",
            "use": "sig",
            "alg": "RS256",
            "kid": self.kid,
            "x5t": self.kid,
            "n": self._n,
            "e": self._e,
        }

    def sign(self, claims: dict[str, Any]) -> str:
        return jwt.encode(
            claims, self.key, algorithm="RS256", headers={"kid": self.kid, "x5t": self.kid}
        )


def issue_access_token(
    key: SigningKey,
    principal: Principal,
    audience: str,
    now: float,
    *,
    appidacr: str,
    lifetime: int = ACCESS_TOKEN_SECONDS,
) -> str:
    """A v1.0 app-only access token for ``principal`` (``appidacr`` 1 = secret, 2 = assertion),
    valid for ``lifetime`` seconds from ``now``."""
    issued = int(now) - _BACKDATE_SECONDS
    claims: dict[str, Any] = {
        "aud": audience,
        "iss": sts_issuer(principal.tenant_id),
        "iat": issued,
        "nbf": issued,
        "exp": int(now) + lifetime,
        "appid": principal.client_id,
        "appidacr": appidacr,
        "idp": sts_issuer(principal.tenant_id),
        "idtyp": "app",
        "oid": principal.sp_object_id,
        "sub": principal.sp_object_id,
        "tid": principal.tenant_id,
        "uti": uuid.uuid4().hex[:22],
        "ver": "1.0",
    }
    if audience in GRAPH_AUDIENCES and principal.roles:
        claims["roles"] = list(principal.roles)
    return key.sign(claims)


@dataclass(frozen=True)
class Caller:
    """Who is calling Graph or ARM, as established from the bearer token."""

    principal: Principal
    tenant_id: str
    roles: frozenset[str]


# A Graph or ARM handler, called once the bearer token has established the caller.
CallerHandler = Callable[[web.Request, dict[str, str], Caller], Awaitable[web.StreamResponse]]


class AuthError(Exception):
    """The bearer token is missing or not acceptable; ``kind`` picks each surface's error code."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # missing | invalid | expired | audience
        self.message = message


def authenticate(
    request: web.Request,
    key: SigningKey,
    directory: Directory,
    clock: Clock,
    audiences: frozenset[str],
) -> Caller:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("missing", "Access token is empty.")
    try:
        claims: dict[str, Any] = jwt.decode(
            token.strip(),
            key.key.public_key(),
            algorithms=["RS256"],
            options={
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
                "verify_aud": False,
            },
        )
    except jwt.PyJWTError as exc:
        raise AuthError("invalid", f"Access token validation failure: {exc}.") from exc
    now = clock.now()
    if not (int(claims.get("nbf", 0)) - 300 <= now < int(claims.get("exp", 0)) + 300):
        raise AuthError("expired", "Lifetime validation failed, the token is expired.")
    if claims.get("aud") not in audiences:
        raise AuthError("audience", "Access token validation failure. Invalid audience.")
    tenant_id = str(claims.get("tid", ""))
    if claims.get("iss") != sts_issuer(tenant_id):
        raise AuthError("invalid", "Access token validation failure. Invalid issuer.")
    principal = directory.by_sp_object_id(str(claims.get("oid", "")))
    if principal is None or principal.tenant_id != tenant_id:
        raise AuthError("invalid", "Access token validation failure. Unknown principal.")
    return Caller(principal, tenant_id, frozenset(str(r) for r in claims.get("roles", [])))
