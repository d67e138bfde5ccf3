"""Fetching an external issuer's signing keys, as Entra does for a federated client assertion.

For an assertion from issuer ``I`` Entra reads ``I/.well-known/openid-configuration``, follows
its ``jwks_uri`` and verifies the assertion's signature with the key named by the ``kid`` header.
In the sandbox ``I`` is typically the Kubernetes API server on ``https://127.0.0.1:PORT``, whose
certificate the sandbox CA signed, so the HTTPS client trusts the sandbox CA besides system roots.

Documents are cached per issuer for ``ttl`` seconds. A ``kid`` missing from a cached key set
triggers one refetch (keys rotate); a kid still missing after that is AADSTS7000272. A discovery
document that cannot be fetched or parsed is AADSTS90061, an unusable JWKS AADSTS50166; the token
endpoint turns these ``ExternalOidcError``s into Entra's error bodies.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt

EXTERNAL_OIDC_FAILED = "Request to External OIDC endpoint failed."


class ExternalOidcError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def outbound_ssl_context(ca_file: Path | None) -> ssl.SSLContext:
    """System roots plus the sandbox CA."""
    context = ssl.create_default_context()
    if ca_file is not None and ca_file.exists():
        context.load_verify_locations(cafile=str(ca_file))
    return context


@dataclass
class _IssuerEntry:
    fetched_at: float
    jwks_uri: str
    keys: dict[str, jwt.PyJWK]


class IssuerKeys:
    def __init__(self, ssl_context: ssl.SSLContext, ttl: float = 300.0, timeout: float = 5.0):
        self._ssl = ssl_context
        self._ttl = ttl
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._cache: dict[str, _IssuerEntry] = {}
        self._session: aiohttp.ClientSession | None = None
        self._locks: dict[str, asyncio.Lock] = {}

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def forget(self) -> None:
        self._cache.clear()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout, connector=aiohttp.TCPConnector(ssl=self._ssl)
            )
        return self._session

    async def _get_json(self, url: str, code: int, accept: str) -> dict[str, Any]:
        if not url.lower().startswith("https://"):
            raise ExternalOidcError(code, f"{EXTERNAL_OIDC_FAILED} The URL '{url}' is not https.")
        try:
            async with self._client().get(url, headers={"Accept": accept}) as resp:
                if resp.status != 200:
                    raise ExternalOidcError(
                        code, f"{EXTERNAL_OIDC_FAILED} GET {url} answered HTTP {resp.status}."
                    )
                document = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise ExternalOidcError(
                code, f"{EXTERNAL_OIDC_FAILED} GET {url}: {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(document, dict):
            raise ExternalOidcError(code, f"{EXTERNAL_OIDC_FAILED} {url} is not a JSON object.")
        return document

    async def _fetch_keys(self, jwks_uri: str) -> dict[str, jwt.PyJWK]:
        # The Kubernetes API server answers 406 to a JWKS request that accepts only JSON.
        document = await self._get_json(
            jwks_uri, 50166, "application/jwk-set+json, application/json"
        )
        keys: dict[str, jwt.PyJWK] = {}
        for data in document.get("keys") or []:
            try:
                key = jwt.PyJWK(data, algorithm="RS256")
            except jwt.PyJWTError:
                continue  # keys of other types or uses are not for us
            keys[str(data.get("kid", ""))] = key
        return keys

    async def _entry(self, issuer: str) -> tuple[_IssuerEntry, bool]:
        """The cached entry, or a new one; the flag says whether it was fetched just now."""
        entry = self._cache.get(issuer)
        if entry is not None and time.monotonic() - entry.fetched_at < self._ttl:
            return entry, False
        discovery_url = issuer.rstrip("/") + "/.well-known/openid-configuration"
        discovery = await self._get_json(discovery_url, 90061, "application/json")
        jwks_uri = discovery.get("jwks_uri")
        if not isinstance(jwks_uri, str):
            raise ExternalOidcError(
                90061, f"{EXTERNAL_OIDC_FAILED} {discovery_url} has no jwks_uri."
            )
        entry = _IssuerEntry(time.monotonic(), jwks_uri, await self._fetch_keys(jwks_uri))
        self._cache[issuer] = entry
        return entry, True

    async def signing_key(self, issuer: str, kid: str | None) -> jwt.PyJWK:
        """The issuer's key for ``kid`` (the only key when the assertion names none)."""
        lock = self._locks.setdefault(issuer, asyncio.Lock())
        async with lock:
            entry, fresh = await self._entry(issuer)
            found = self._pick(entry, kid)
            if found is None and not fresh:
                entry.keys = await self._fetch_keys(entry.jwks_uri)
                entry.fetched_at = time.monotonic()
                found = self._pick(entry, kid)
        if found is None:
            raise ExternalOidcError(
                7000272,
                f"The key used to sign the client assertion (kid '{kid}') was not found in the "
                f"keys published by issuer '{issuer}'.",
            )
        return found

    @staticmethod
    def _pick(entry: _IssuerEntry, kid: str | None) -> jwt.PyJWK | None:
        if kid is None:
            return next(iter(entry.keys.values())) if len(entry.keys) == 1 else None
        return entry.keys.get(kid)
