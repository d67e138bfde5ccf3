"""Entra's token exchange as a pod performs it, for the Verified probe.

azure-identity's ``WorkloadIdentityCredential`` in a pod posts the projected service-account token
to ``{authority}/{tenant}/oauth2/v2.0/token`` as a jwt-bearer client assertion and gets an access
token for the identity. The probe does exactly that, once per probe and without a credential's
cache or retries, because it needs Entra's own answer: the AADSTS code says which link of the
chain is broken (``ExchangeRejected``). Throttling, 5xx and network failures are
``TransientError``, retried by kopf like every other cloud call.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import httpx
from httpx_aiohttp import HttpxAiohttpClient

from swi_operator import metrics
from swi_operator.errors import Reason, TransientError, retry_after_seconds

HTTP_TIMEOUT_S = 30.0
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


class ExchangeRejected(Exception):
    """Entra refused the exchange: HTTP 4xx with ``error`` and ``AADSTSnnnnn: ...``."""

    def __init__(self, status: int, error: str, codes: tuple[int, ...], description: str) -> None:
        super().__init__(description)
        self.status = status
        self.error = error
        self.codes = codes
        self.description = description

    @property
    def code(self) -> int | None:
        return self.codes[0] if self.codes else None

    @property
    def summary(self) -> str:
        """Entra's description without the trace and correlation ids it appends."""
        first = (self.description.strip().splitlines() or [self.error])[0]
        return first.split(" Trace ID:")[0].strip()


class TokenExchange(Protocol):
    async def exchange(self, tenant_id: str, client_id: str, assertion: str, scope: str) -> str:
        """An access token for ``client_id``, or ``ExchangeRejected`` / ``TransientError``."""
        ...


class EntraTokenExchange:
    def __init__(self, authority: str, ca_bundle: Path | None = None) -> None:
        self._authority = authority.rstrip("/")
        verify: ssl.SSLContext | bool = (
            ssl.create_default_context(cafile=str(ca_bundle)) if ca_bundle else True
        )
        # trust_env: HTTPS_PROXY as for the operator's other Azure calls.
        self._http = HttpxAiohttpClient(
            timeout=HTTP_TIMEOUT_S,
            verify=verify,
            trust_env=True,
            event_hooks=metrics.httpx_hooks("entra"),
        )

    async def exchange(self, tenant_id: str, client_id: str, assertion: str, scope: str) -> str:
        url = f"{self._authority}/{tenant_id}/oauth2/v2.0/token"
        form = {
            "grant_type": "client_credentials",
            "client_id": client_id,
            "scope": scope,
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": assertion,
        }
        doing = f"exchange a service-account token for application {client_id}"
        try:
            response = await self._http.post(url, data=form)
        except (httpx.HTTPError, aiohttp.ClientError) as exc:
            raise TransientError(
                Reason.CLOUD_UNAVAILABLE, f"cannot reach Entra ({url}) to {doing}: {exc}"
            ) from exc
        body = _json(response)
        if response.status_code == 200 and isinstance(body.get("access_token"), str):
            return str(body["access_token"])
        if response.status_code == 429:
            raise TransientError(
                Reason.THROTTLED,
                f"Entra is throttling token requests while trying to {doing}",
                retry_after_seconds(dict(response.headers)),
            )
        if response.status_code >= 500 or not body.get("error"):
            raise TransientError(
                Reason.CLOUD_UNAVAILABLE,
                f"Entra answered {response.status_code} while trying to {doing}: "
                f"{response.text[:300]}",
                retry_after_seconds(dict(response.headers)),
            )
        codes = tuple(int(c) for c in body.get("error_codes") or () if str(c).isdigit())
        raise ExchangeRejected(
            response.status_code,
            str(body.get("error")),
            codes,
            str(body.get("error_description") or body.get("error")),
        )

    async def close(self) -> None:
        await self._http.aclose()


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
