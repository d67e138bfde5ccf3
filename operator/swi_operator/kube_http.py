"""The operator's own requests to the API server, on the event loop (aiohttp).

The official client (``kubernetes``) is synchronous: each call ran in one of 16 worker threads,
through urllib3 and the client's serialization, and handed the GIL back and forth with the event
loop. While onboarding 1,000 resources that was a fifth of the operator's Python time plus most
of its kernel time (futex waits and context switches; docs/benchmarks.md, issue 23). aiohttp is
already the operator's (kopf's own API client is built on it), parses HTTP in C and runs on the
loop that awaits the answer.

The official client still does what it is good at: ``Configuration`` (the kubeconfig or the pod's
service account) gives the server, the TLS material and the credentials, and its
``auth_settings()`` is asked again for every request, so a token that the configuration refreshes
(the in-cluster token file, an exec plugin) is used as it rotates.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Mapping, Sequence
from typing import Any, cast
from urllib.parse import urlencode

import aiohttp
from kubernetes.client import Configuration
from kubernetes.client.exceptions import ApiException
from yarl import URL

USER_AGENT = "sql-workload-identity-operator"


def ssl_context(config: Configuration) -> ssl.SSLContext | bool:
    """What aiohttp verifies the API server with: its CA (or the system's), the client
    certificate if the kubeconfig has one; False only where the kubeconfig says
    ``insecure-skip-tls-verify``."""
    if not config.verify_ssl:
        return False
    context = ssl.create_default_context(cafile=config.ssl_ca_cert or None)
    if config.cert_file:
        context.load_cert_chain(config.cert_file, config.key_file or None)
    if config.assert_hostname is False:
        context.check_hostname = False
    return context


class ApiServerSession:
    """One keep-alive pool of at most ``limit`` connections to the API server; made on first
    use, inside the loop that uses it."""

    def __init__(self, config: Configuration, limit: int, timeout_s: float) -> None:
        self._config = config
        self._base = str(config.host).rstrip("/")
        self._ssl = ssl_context(config)
        self._server_hostname = getattr(config, "tls_server_name", None) or None
        self._limit = limit
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=timeout_s, sock_read=timeout_s
        )
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._limit, ssl=self._ssl),
                timeout=self._timeout,
                cookie_jar=aiohttp.DummyCookieJar(),  # the API server sets none
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    def _headers(self, content_type: str | None) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        if content_type:
            headers["Content-Type"] = content_type
        for auth in self._config.auth_settings().values():
            setting = cast(Mapping[str, Any], auth)  # typed as an object by the client
            if setting.get("in") == "header" and setting.get("value"):
                headers[str(setting["key"])] = str(setting["value"])
        return headers

    async def send(
        self,
        method: str,
        path: str,
        query: Sequence[tuple[str, str]] = (),
        body: Any = None,
        content_type: str | None = None,
        decode: bool = True,
    ) -> Any:
        """The decoded JSON answer (None for an empty one), or True when ``decode`` is False
        (a write whose answer nobody reads). A status outside 2xx raises ``ApiException`` with
        the API server's status, reason and body, as the official client does."""
        url = self._base + path + ("?" + urlencode(query) if query else "")
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            content_type = content_type or "application/json"
        async with self._open().request(
            method,
            URL(url, encoded=True),
            data=data,
            headers=self._headers(content_type),
            server_hostname=self._server_hostname,
        ) as response:
            raw = await response.read()
            if not 200 <= response.status <= 299:
                raise ApiException(
                    status=response.status,
                    reason=response.reason,
                    body=raw.decode(errors="replace"),
                )
        if not decode:
            return True
        return json.loads(raw) if raw else None

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
            await asyncio.sleep(0)  # let the connector's transports close before the loop does
