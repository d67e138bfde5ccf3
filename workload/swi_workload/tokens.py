"""Access tokens for Azure SQL: which credential, when to retry, and what each failure means.

In a federated pod the credential is azure-identity's ``WorkloadIdentityCredential``, which trades
the projected service-account token for an Entra access token and caches it until near expiry.
For the seed's local test (a secret in ``AZ_CLIENT_SECRET``) it is ``ClientSecretCredential``.

Retries of the token service belong to exactly one layer: azure-core's retry policy inside the
credential, configured from ``Settings.backoff`` (attempts, capped exponential backoff). It retries
5xx, 429 (honouring Retry-After) and connection failures *below* MSAL, which matters: MSAL caches a
5xx answer for a while, so a retry loop above the credential would only replay the cached failure.
What still fails is final here and is translated into an exception that says what to fix.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any, Protocol

from azure.core.credentials import AccessToken
from azure.core.exceptions import ClientAuthenticationError, ServiceRequestError

from swi_workload.errors import (
    ConfigurationError,
    NoMatchingFederatedCredentialError,
    NotFederatedError,
    TokenServiceError,
)
from swi_workload.settings import SQL_SCOPE, Settings

# Authority hosts MSAL knows; any other needs instance discovery turned off.
KNOWN_AUTHORITIES = frozenset(
    {"login.microsoftonline.com", "login.microsoftonline.us", "login.chinacloudapi.cn"}
)
# AADSTS codes that all mean "no federated credential matches this assertion".
NO_MATCH_CODES = ("AADSTS70021", "AADSTS700211", "AADSTS700212", "AADSTS700213", "AADSTS7002138")
NOT_FEDERATED_HINT = (
    'label the pod (or its Deployment\'s pod template) azure.workload.identity/use: "true" and '
    "annotate its service account with azure.workload.identity/client-id; the webhook injects "
    "only when a pod is created, so restart pods that started before that"
)


class TokenCredential(Protocol):
    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken: ...


def unverified_claims(token: str) -> dict[str, Any]:
    """The unverified claims of a JWT (for error messages only)."""
    try:
        payload = token.strip().split(".")[1]
        padded = payload + "=" * (-len(payload) % 4)
        claims = json.loads(base64.urlsafe_b64decode(padded))
    except (IndexError, ValueError):
        return {}
    return claims if isinstance(claims, dict) else {}


def _retry_options(settings: Settings) -> dict[str, Any]:
    backoff = settings.backoff
    return {
        "retry_total": max(backoff.attempts - 1, 0),
        "retry_backoff_factor": backoff.first,
        "retry_backoff_max": backoff.cap,
    }


def build_credential(settings: Settings) -> TokenCredential:
    """The credential the environment calls for (see the module docstring)."""
    from azure.identity import ClientSecretCredential, WorkloadIdentityCredential

    missing = [
        name
        for name, value in (
            ("AZURE_TENANT_ID", settings.tenant_id),
            ("AZURE_CLIENT_ID", settings.client_id),
        )
        if not value
    ]
    authority = settings.authority_host
    if settings.token_file:
        if not os.path.isfile(settings.token_file):
            raise NotFederatedError(
                f"AZURE_FEDERATED_TOKEN_FILE is {settings.token_file}, which does not exist: the "
                f"projected service account token is not mounted; {NOT_FEDERATED_HINT}"
            )
        if missing:
            raise ConfigurationError(
                f"{' and '.join(missing)} not set: the service account needs the annotation "
                "azure.workload.identity/client-id (and tenant-id if not the webhook's default)"
            )
        kwargs = _retry_options(settings)
        if authority:
            kwargs["authority"] = authority
        return WorkloadIdentityCredential(
            tenant_id=settings.tenant_id,
            client_id=settings.client_id,
            token_file_path=settings.token_file,
            **kwargs,
        )
    if settings.client_secret:
        if missing:
            raise ConfigurationError(f"{' and '.join(missing)} not set (AZ_TENANT_ID/AZ_CLIENT_ID)")
        assert settings.tenant_id is not None and settings.client_id is not None
        host = (authority or "login.microsoftonline.com").split("://")[-1].split("/")[0]
        secret_kwargs = _retry_options(settings)
        if authority:
            secret_kwargs["authority"] = authority
        if host.split(":")[0] not in KNOWN_AUTHORITIES:
            secret_kwargs["disable_instance_discovery"] = True
        return ClientSecretCredential(
            settings.tenant_id, settings.client_id, settings.client_secret, **secret_kwargs
        )
    raise NotFederatedError(
        f"AZURE_FEDERATED_TOKEN_FILE is not set: this pod is not federated; {NOT_FEDERATED_HINT}"
    )


class TokenSource:
    """Tokens for SQL logins, with actionable errors (retries happen inside the credential).

    Call :meth:`get` once per *physical connection*; the credential caches the token, so a new
    connection within its lifetime costs no round trip to Entra.
    """

    def __init__(self, settings: Settings, credential: TokenCredential | None = None) -> None:
        self._settings = settings
        self._credential = credential or build_credential(settings)
        self.requests = 0  # calls to the credential: what the "no token per query" test checks

    def get(self) -> AccessToken:
        self.requests += 1
        try:
            return self._credential.get_token(SQL_SCOPE)
        except (ClientAuthenticationError, ServiceRequestError, OSError) as exc:
            raise self._translate(exc) from exc

    def _translate(self, exc: Exception) -> Exception:
        if isinstance(exc, OSError):  # the token file vanished between checks
            return NotFederatedError(
                f"cannot read the service account token: {exc}; {NOT_FEDERATED_HINT}"
            )
        text = str(getattr(exc, "message", None) or exc)
        status = getattr(exc, "status_code", None)
        if status is None:
            response = getattr(exc, "response", None)
            status = getattr(response, "status_code", None)
        if any(code in text for code in NO_MATCH_CODES):
            return NoMatchingFederatedCredentialError(self._no_match_message(text))
        if isinstance(exc, ServiceRequestError):
            return TokenServiceError(f"the token service is unreachable: {text}")
        first_line = text.splitlines()[0] if text else type(exc).__name__
        where = self._settings.authority_host or "https://login.microsoftonline.com"
        http = f" (HTTP {status})" if status else ""
        retried = (
            f", after {self._settings.backoff.attempts} attempts"
            if (status is None or status >= 500 or status == 429)
            else ""
        )
        return TokenServiceError(
            f"the token request to {where} failed{http}{retried}: {first_line}", status=status
        )

    def _no_match_message(self, text: str) -> str:
        claims: dict[str, Any] = {}
        if self._settings.token_file:
            try:
                with open(self._settings.token_file, encoding="utf-8") as handle:
                    claims = unverified_claims(handle.read())
            except OSError:
                claims = {}
        audience = claims.get("aud")
        if isinstance(audience, list):
            audience = audience[0] if len(audience) == 1 else ", ".join(map(str, audience))
        subject = str(claims.get("sub", "?"))
        parts = subject.split(":")
        where = (
            f" (service account {parts[3]!r} in namespace {parts[2]!r})"
            if len(parts) == 4 and parts[:2] == ["system", "serviceaccount"]
            else ""
        )
        code = next(c for c in NO_MATCH_CODES if c in text)
        return (
            f"Entra has no federated identity credential on application "
            f"{self._settings.client_id} matching this pod's token ({code}). The token has "
            f"issuer '{claims.get('iss', '?')}', subject '{subject}'{where}, audience "
            f"'{audience or '?'}'. Add a federated credential with exactly these values "
            "(matching is case-sensitive) or create a SqlWorkloadIdentity for this service "
            "account; a credential created minutes ago may still be propagating."
        )
