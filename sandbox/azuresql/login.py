"""FEDAUTH login: check an Entra access token the way Azure SQL does, with Azure SQL's error texts.

A client logs in with a v1 access token (LOGIN7 FeatureExt FEDAUTH, library "security token").
The server verifies, in order:

1. the signature (RS256) against the Entra emulator's signing keys for the server's tenant
   (``{entra}/{tenant}/discovery/v2.0/keys``, fetched over HTTPS trusting the sandbox CA and cached
   with a TTL; an unknown ``kid`` triggers one refetch, as key rollover would);
2. the audience (``https://database.windows.net/`` with or without the trailing slash) and the
   tenant (``tid`` and ``iss``): a token for another resource or another tenant gets
   "The server is not currently configured to accept this token.";
3. expiry: "Token is expired." (state 233, as seen in the wild).

Every refusal is error 18456, class 14, "Login failed for user '<token-identified principal>'."
plus the reason where Azure SQL gives one. Mapping the token to a database user (and the Entra
admin) is the engine's job; this module only says who the token is.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import requests

SQL_SPN = "https://database.windows.net/"
SQL_AUDIENCES = frozenset({"https://database.windows.net/", "https://database.windows.net"})
TOKEN_PRINCIPAL = "<token-identified principal>"  # noqa: S105 (not a secret)
LOGIN_FAILED = f"Login failed for user '{TOKEN_PRINCIPAL}'."
NOT_CONFIGURED = f"{LOGIN_FAILED} The server is not currently configured to accept this token."
TOKEN_EXPIRED = f"{LOGIN_FAILED} Token is expired."
JWKS_TTL_S = 300.0
JWKS_MIN_REFRESH_S = 5.0


class LoginRefused(Exception):
    """A login the server refuses; carries the SQL error number, state and message."""

    def __init__(
        self, message: str, *, number: int = 18456, state: int = 1, severity: int = 14
    ) -> None:
        super().__init__(message)
        self.message = message
        self.number = number
        self.state = state
        self.severity = severity


@dataclass(frozen=True)
class TokenPrincipal:
    """Who a verified token says the caller is."""

    tenant_id: str
    object_id: str  # the service principal's (or user's) object id
    app_id: str | None  # the client id, for applications
    name: str  # display name where the token carries one

    @property
    def login(self) -> str:
        """What SUSER_SNAME() shows for this principal."""
        return f"{self.app_id or self.object_id}@{self.tenant_id}"

    @property
    def sid(self) -> bytes:
        """The SID Azure SQL stores for this principal's contained user.

        Applications are identified by their client id, users by their object id, both as the
        GUID's little-endian bytes (what ``CREATE USER ... WITH SID = ..., TYPE = E`` takes).
        """
        return uuid.UUID(self.app_id or self.object_id).bytes_le


class TokenVerifier:
    """Verifies access tokens against the Entra emulator's keys (thread-safe, blocking)."""

    def __init__(self, entra_url: str, ca_file: Path | None, *, ttl_s: float = JWKS_TTL_S) -> None:
        self._entra_url = entra_url.rstrip("/")
        self._verify: str | bool = str(ca_file) if ca_file else True
        self._ttl_s = ttl_s
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, jwt.PyJWKSet]] = {}

    def _keys(self, tenant: str, *, refresh: bool = False) -> jwt.PyJWKSet:
        with self._lock:
            cached = self._cache.get(tenant)
            now = time.monotonic()
            fresh = cached is not None and now - cached[0] < self._ttl_s
            recent = cached is not None and now - cached[0] < JWKS_MIN_REFRESH_S
            if cached and ((fresh and not refresh) or recent):
                return cached[1]
            url = f"{self._entra_url}/{tenant}/discovery/v2.0/keys"
            response = requests.get(url, verify=self._verify, timeout=10.0)
            response.raise_for_status()
            keys = jwt.PyJWKSet.from_dict(response.json())
            self._cache[tenant] = (now, keys)
            return keys

    def _signing_key(self, tenant: str, kid: str | None) -> Any:
        for refresh in (False, True):
            try:
                keys = self._keys(tenant, refresh=refresh)
            except (requests.RequestException, jwt.PyJWKSetError) as exc:
                raise LoginRefused(LOGIN_FAILED, state=1) from exc
            for key in keys.keys:
                if kid is None or key.key_id == kid:
                    return key.key
        raise LoginRefused(NOT_CONFIGURED, state=1)

    def verify(self, token: str, tenant: str) -> TokenPrincipal:
        """The principal of a valid token for a server in ``tenant``; raises LoginRefused."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise LoginRefused(LOGIN_FAILED, state=1) from exc
        key = self._signing_key(tenant, header.get("kid"))
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=["RS256"],
                options={
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_aud": False,
                    "verify_iss": False,
                },
            )
        except jwt.PyJWTError as exc:
            raise LoginRefused(NOT_CONFIGURED, state=1) from exc
        if claims.get("aud") not in SQL_AUDIENCES:
            raise LoginRefused(NOT_CONFIGURED, state=1)
        tid = str(claims.get("tid", ""))
        issuers = {
            f"https://sts.windows.net/{tenant}/",
            f"https://login.microsoftonline.com/{tenant}/v2.0",
        }
        if tid.lower() != tenant.lower() or claims.get("iss") not in issuers:
            raise LoginRefused(NOT_CONFIGURED, state=1)
        now = time.time()
        if float(claims.get("exp", 0)) <= now:
            raise LoginRefused(TOKEN_EXPIRED, state=233)
        if float(claims.get("nbf", 0)) > now + 300:
            raise LoginRefused(LOGIN_FAILED, state=1)
        oid = str(claims.get("oid") or claims.get("sub") or "")
        # App-only tokens carry no scp/upn; in a user's token appid is the client app, not them.
        is_user = "scp" in claims or "upn" in claims or claims.get("idtyp") == "user"
        app_id = None if is_user else claims.get("appid") or claims.get("azp")
        if not oid:
            raise LoginRefused(LOGIN_FAILED, state=1)
        name = str(claims.get("app_displayname") or claims.get("upn") or claims.get("name") or "")
        return TokenPrincipal(tid, oid, str(app_id) if app_id else None, name)
