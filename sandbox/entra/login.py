"""The token service: ``login.microsoftonline.com`` as MSAL and azure-identity use it.

Routes (names in brackets are what the test controls key on):
- ``GET /common/discovery/instance`` [login.instance]: MSAL's instance discovery for authority hosts
  it does not know. Hosts the emulator serves are valid instances; the answer points tenant
  discovery back at the host the client named.
- ``GET /{tenant}/v2.0/.well-known/openid-configuration`` and the v1 ``/{tenant}/.well-known/...``
  [login.discovery]: endpoints are built from the Host header, so a client that reached the
  emulator as ``localhost:PORT`` or, through the proxy, as ``login.microsoftonline.com`` is sent
  back to the same place.
- ``GET /{tenant}/discovery/v2.0/keys``, ``/{tenant}/discovery/keys``, ``/common/discovery/keys``
  [login.keys]: the emulator's signing key (tokens.py).
- ``POST /{tenant}/oauth2/v2.0/token`` and v1 ``/{tenant}/oauth2/token`` [login.token]: the
  client-credentials grant with a client secret or with a jwt-bearer client assertion.

Assertion checks run in Entra's order as far as observable: the client's federated credentials are
matched first (exact, case-sensitive issuer, subject and audience; credentials younger than the
configured propagation delay do not count yet), then the issuer's keys are fetched (oidc.py) and
the signature and time window verified. Every failure is an ``Aadsts`` carrying the AADSTS code,
rendered as Entra's OAuth error body so that MSAL and azure-identity raise
``ClientAuthenticationError`` with the code in the message.
"""

from __future__ import annotations

import datetime as dt
import hmac
import json
import uuid
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlparse

import jwt
from aiohttp import web

from sandbox.entra.faults import Controls
from sandbox.entra.oidc import ExternalOidcError, IssuerKeys
from sandbox.entra.routing import LOOPBACK_NAMES, PathParams, Router, Surface, base_url
from sandbox.entra.state import Directory, FederatedCredential, Principal, Tenant
from sandbox.entra.tokens import (
    RESOURCE_AUDIENCES,
    SigningKey,
    issue_access_token,
    sts_issuer,
)

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_SKEW_SECONDS = 300
_WIF_DOCS = "https://learn.microsoft.com/entra/workload-id/workload-identity-federation"
_MISMATCH_HINT = (
    "Please check your federated identity credential Subject, Audience and Issuer against the "
    f"presented assertion. {_WIF_DOCS}"
)
_MULTI_TENANT = frozenset({"common", "organizations", "consumers"})


class Aadsts(Exception):
    """An Entra token-service failure: HTTP status, OAuth ``error`` and the AADSTS code."""

    def __init__(self, status: int, error: str, code: int, text: str) -> None:
        super().__init__(f"AADSTS{code}: {text}")
        self.status, self.error, self.code, self.text = status, error, code, text


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _json(body: Any, *, status: int = 200) -> web.Response:
    """JSON as Entra writes it: compact, no spaces. Some clients depend on it: ODBC Driver 18
    finds ``"access_token":"`` and ``"expires_on":"`` by plain text search, and with a space after
    the colon it silently never sends the token it fetched."""
    return web.json_response(body, status=status, dumps=_compact)


def _utc(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def oauth_error(request: web.Request, failure: Aadsts) -> web.Response:
    trace_id = str(uuid.uuid4())
    correlation_id = request.headers.get("client-request-id") or str(uuid.uuid4())
    timestamp = _utc(dt.datetime.now(dt.UTC).timestamp())
    description = (
        f"AADSTS{failure.code}: {failure.text} Trace ID: {trace_id} "
        f"Correlation ID: {correlation_id} Timestamp: {timestamp}"
    )
    body = {
        "error": failure.error,
        "error_description": description,
        "error_codes": [failure.code],
        "timestamp": timestamp,
        "trace_id": trace_id,
        "correlation_id": correlation_id,
        "error_uri": f"{base_url(request)}/error?code={failure.code}",
    }
    return _json(body, status=failure.status)


def render_error(request: web.Request, status: int, code: str, message: str) -> web.Response:
    """Router errors (injected faults, unknown paths) in the token service's shape."""
    if status in (429, 503):
        failure = Aadsts(status, "temporarily_unavailable", 90033, f"{code}: {message}")
    else:
        failure = Aadsts(status, "invalid_request", 900561 if status == 405 else 90011, message)
    return oauth_error(request, failure)


def tenant_not_found(name: str) -> Aadsts:
    return Aadsts(
        400,
        "invalid_tenant",
        90002,
        f"Tenant '{name}' not found. Check to make sure you have the correct tenant ID and are "
        "signing into the correct cloud. Check with your subscription administrator, this may "
        "happen if there are no active subscriptions for the tenant.",
    )


def _missing(parameter: str) -> Aadsts:
    return Aadsts(
        400,
        "invalid_request",
        900144,
        f"The request body must contain the following parameter: '{parameter}'.",
    )


def _audiences(claim: Any) -> list[str]:
    if isinstance(claim, str):
        return [claim]
    if isinstance(claim, list):
        return [str(a) for a in claim]
    return []


class LoginService:
    def __init__(
        self,
        directory: Directory,
        key: SigningKey,
        controls: Controls,
        issuer_keys: IssuerKeys,
        served_hosts: Iterable[str],
    ) -> None:
        self.directory = directory
        self.key = key
        self.controls = controls
        self.issuer_keys = issuer_keys
        self.served_hosts = frozenset(h.lower() for h in served_hosts)

    def register(self, router: Router) -> None:
        t = r"/(?P<tenant>[^/]+)"
        add = router.add
        add(Surface.LOGIN, "GET", r"/common/discovery/instance", "login.instance", self.instance)
        add(
            Surface.LOGIN,
            "GET",
            t + r"/v2\.0/\.well-known/openid-configuration",
            "login.discovery",
            self.discovery_v2,
        )
        add(
            Surface.LOGIN,
            "GET",
            t + r"/\.well-known/openid-configuration",
            "login.discovery",
            self.discovery_v1,
        )
        add(Surface.LOGIN, "GET", t + r"/discovery(?:/v2\.0)?/keys", "login.keys", self.keys)
        add(Surface.LOGIN, "POST", t + r"/oauth2(?P<v2>/v2\.0)?/token", "login.token", self.token)

    # -- discovery ---------------------------------------------------------------------------
    def _tenant_for_discovery(self, request: web.Request, name: str) -> str:
        if name.lower() in _MULTI_TENANT:
            return "{tenantid}"
        tenant = self.directory.tenant(name)
        if tenant is None:
            raise tenant_not_found(name)
        return tenant.id

    async def instance(self, request: web.Request, _: PathParams) -> web.StreamResponse:
        endpoint = request.query.get("authorization_endpoint", "")
        parsed = urlparse(endpoint)
        segments = [s for s in parsed.path.split("/") if s]
        if (parsed.hostname or "").lower() not in self.served_hosts or not segments:
            return oauth_error(
                request,
                Aadsts(400, "invalid_instance", 50049, "Unknown or invalid instance."),
            )
        host = parsed.netloc
        if parsed.port is None and parsed.hostname in LOOPBACK_NAMES:
            # MSAL drops the authority's port when it builds this query; a loopback authority can
            # only mean this emulator, so point tenant discovery back at the port we listen on.
            sockname = request.transport.get_extra_info("sockname") if request.transport else None
            if sockname:
                host = f"{parsed.hostname}:{sockname[1]}"
        return _json(
            {
                "tenant_discovery_endpoint": (
                    f"https://{host}/{segments[0]}/v2.0/.well-known/openid-configuration"
                ),
                "api-version": "1.1",
                "metadata": [
                    {"preferred_network": host, "preferred_cache": host, "aliases": [host]}
                ],
            }
        )

    async def discovery_v2(self, request: web.Request, params: PathParams) -> web.StreamResponse:
        try:
            tid = self._tenant_for_discovery(request, params["tenant"])
        except Aadsts as failure:
            return oauth_error(request, failure)
        base = f"{base_url(request)}/{tid}"
        return _json(
            {
                "issuer": f"{base}/v2.0",
                "token_endpoint": f"{base}/oauth2/v2.0/token",
                "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
                "end_session_endpoint": f"{base}/oauth2/v2.0/logout",
                "jwks_uri": f"{base}/discovery/v2.0/keys",
                "token_endpoint_auth_methods_supported": [
                    "client_secret_post",
                    "private_key_jwt",
                    "client_secret_basic",
                ],
                "response_types_supported": ["code", "id_token", "code id_token", "token"],
                "subject_types_supported": ["pairwise"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "scopes_supported": ["openid", "profile", "email", "offline_access"],
                "request_uri_parameter_supported": False,
                "tenant_region_scope": "NA",
                "cloud_instance_name": "microsoftonline.com",
                "cloud_graph_host_name": "graph.windows.net",
                "msgraph_host": "graph.microsoft.com",
            }
        )

    async def discovery_v1(self, request: web.Request, params: PathParams) -> web.StreamResponse:
        try:
            tid = self._tenant_for_discovery(request, params["tenant"])
        except Aadsts as failure:
            return oauth_error(request, failure)
        base = base_url(request)
        return _json(
            {
                "issuer": sts_issuer(tid),
                "token_endpoint": f"{base}/{tid}/oauth2/token",
                "authorization_endpoint": f"{base}/{tid}/oauth2/authorize",
                "jwks_uri": f"{base}/common/discovery/keys",
                "token_endpoint_auth_methods_supported": [
                    "client_secret_post",
                    "private_key_jwt",
                    "client_secret_basic",
                ],
                "id_token_signing_alg_values_supported": ["RS256"],
                "subject_types_supported": ["pairwise"],
                "cloud_instance_name": "microsoftonline.com",
            }
        )

    async def keys(self, request: web.Request, params: PathParams) -> web.StreamResponse:
        if params["tenant"].lower() not in _MULTI_TENANT:
            try:
                self._tenant_for_discovery(request, params["tenant"])
            except Aadsts as failure:
                return oauth_error(request, failure)
        return _json({"keys": [self.key.jwk()]})

    # -- token -------------------------------------------------------------------------------
    async def token(self, request: web.Request, params: PathParams) -> web.StreamResponse:
        form = await request.post()
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        try:
            tenant = self.directory.tenant(params["tenant"])
            if tenant is None:
                raise tenant_not_found(params["tenant"])
            audience = self._audience(fields, tenant, v2=bool(params.get("v2")))
            principal = self._client(fields, tenant)
            appidacr = await self._authenticate_client(fields, principal)
        except Aadsts as failure:
            return oauth_error(request, failure)
        now = self.controls.clock.now()
        lifetime = self.controls.settings.token_lifetime_seconds
        body: dict[str, Any] = {
            "token_type": "Bearer",
            "expires_in": lifetime,
            "ext_expires_in": lifetime,
            "access_token": issue_access_token(
                self.key, principal, audience, now, appidacr=appidacr, lifetime=lifetime
            ),
        }
        if not params.get("v2"):
            # The v1 endpoint answers every number as a string, and names the resource.
            body.update(
                expires_in=str(lifetime),
                ext_expires_in=str(lifetime),
                expires_on=str(int(now) + lifetime),
                not_before=str(int(now)),
                resource=fields.get("resource", ""),
            )
        return _json(body)

    def _audience(self, fields: dict[str, str], tenant: Tenant, *, v2: bool) -> str:
        grant_type = fields.get("grant_type")
        if not grant_type:
            raise _missing("grant_type")
        if grant_type != "client_credentials":
            raise Aadsts(
                400,
                "unsupported_grant_type",
                70003,
                f"The app requested an unsupported grant type '{grant_type}'.",
            )
        if v2:
            scope = fields.get("scope")
            if not scope:
                raise _missing("scope")
            scopes = scope.split()
            if len(scopes) != 1 or not scopes[0].endswith("/.default"):
                raise Aadsts(
                    400,
                    "invalid_scope",
                    1002012,
                    f"The provided value for scope {scope} is not valid. Client credential flows "
                    "must have a scope value with /.default suffixed to the resource identifier "
                    "(application ID URI).",
                )
            resource = scopes[0][: -len("/.default")]
        else:
            resource = fields.get("resource", "")
            if not resource:
                raise _missing("resource")
        audience = RESOURCE_AUDIENCES.get(resource.rstrip("/").lower())
        if audience is None:
            raise Aadsts(
                400,
                "invalid_resource",
                500011,
                f"The resource principal named {resource} was not found in the tenant named "
                f"{tenant.domain}. This can happen if the application has not been installed by "
                "the administrator of the tenant or consented to by any user in the tenant. You "
                "might have sent your authentication request to the wrong tenant.",
            )
        return audience

    def _client(self, fields: dict[str, str], tenant: Tenant) -> Principal:
        client_id = fields.get("client_id")
        if not client_id:
            raise _missing("client_id")
        principal = self.directory.by_client_id(client_id)
        if principal is None or principal.tenant_id != tenant.id:
            raise Aadsts(
                400,
                "unauthorized_client",
                700016,
                f"Application with identifier '{client_id}' was not found in the directory "
                f"'{tenant.domain}'. This can happen if the application has not been installed "
                "by the administrator of the tenant or consented to by any user in the tenant. "
                "You may have sent your authentication request to the wrong tenant.",
            )
        if not principal.has_service_principal:
            # An app registered through Graph signs in only once its service principal exists.
            raise Aadsts(
                400,
                "invalid_client",
                7000229,
                f"The client application {client_id} is missing service principal in the tenant "
                f"{tenant.id}.",
            )
        return principal

    async def _authenticate_client(self, fields: dict[str, str], principal: Principal) -> str:
        """Check the client's secret or assertion; returns ``appidacr`` (1 secret, 2 assertion)."""
        secret = fields.get("client_secret")
        assertion = fields.get("client_assertion")
        if secret is not None:
            if not any(hmac.compare_digest(secret, s) for s in principal.secrets):
                raise Aadsts(
                    401,
                    "invalid_client",
                    7000215,
                    "Invalid client secret provided. Ensure the secret being sent in the request "
                    "is the client secret value, not the client secret ID, for a secret added to "
                    f"app '{principal.client_id}'.",
                )
            return "1"
        if assertion is not None:
            if fields.get("client_assertion_type") != JWT_BEARER:
                raise Aadsts(
                    400,
                    "invalid_request",
                    50027,
                    f"JWT token is invalid or malformed: client_assertion_type must be "
                    f"'{JWT_BEARER}'.",
                )
            await self._check_assertion(principal, assertion)
            return "2"
        raise Aadsts(
            401,
            "invalid_client",
            7000218,
            "The request body must contain the following parameter: 'client_assertion' or "
            "'client_secret'.",
        )

    async def _check_assertion(self, principal: Principal, assertion: str) -> None:
        try:
            header = jwt.get_unverified_header(assertion)
            claims: dict[str, Any] = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise Aadsts(
                400, "invalid_request", 50027, f"JWT token is invalid or malformed: {exc}."
            ) from exc
        issuer, subject = str(claims.get("iss", "")), str(claims.get("sub", ""))
        audiences = _audiences(claims.get("aud"))
        self._match_credential(principal, issuer, subject, audiences)

        try:
            key = await self.issuer_keys.signing_key(issuer, header.get("kid"))
        except ExternalOidcError as exc:
            error = "invalid_client" if exc.code == 7000272 else "invalid_request"
            raise Aadsts(400, error, exc.code, exc.message) from exc
        try:
            jwt.decode(
                assertion,
                key,
                algorithms=["RS256"],
                options={
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": False,
                    "require": ["exp"],
                },
            )
        except jwt.PyJWTError as exc:
            raise Aadsts(
                400,
                "invalid_client",
                7000274,
                f"Key was found, but use of the key to verify the signature failed: {exc}.",
            ) from exc

        now = self.controls.clock.now()
        expires = float(claims["exp"])
        not_before = float(claims.get("nbf", claims.get("iat", now)))
        if not (not_before - ASSERTION_SKEW_SECONDS <= now <= expires + ASSERTION_SKEW_SECONDS):
            raise Aadsts(
                400,
                "invalid_client",
                700024,
                f"Client assertion is not within its valid time range. Current time: {_utc(now)}, "
                f"assertion valid from {_utc(not_before)}, expiry time of assertion "
                f"{_utc(expires)}. Review the documentation at "
                "https://learn.microsoft.com/entra/identity-platform/certificate-credentials .",
            )

    def _match_credential(
        self, principal: Principal, issuer: str, subject: str, audiences: list[str]
    ) -> None:
        """Find a federated credential that matches exactly, or say why none does."""
        now = self.controls.clock.real()
        delay = self.controls.settings.propagation_seconds
        credentials = list(principal.credentials.values())
        effective = [c for c in credentials if c.updated_at + delay <= now]

        def exact(c: FederatedCredential) -> bool:
            return c.issuer == issuer and c.subject == subject and c.audiences[0] in audiences

        if any(exact(c) for c in effective):
            return
        if not effective or any(exact(c) for c in credentials):
            # Nothing to compare against yet (none created, or not propagated): the generic error.
            raise Aadsts(
                400,
                "invalid_request",
                70021,
                "No matching federated identity record found for presented assertion. Assertion "
                f"Issuer: '{issuer}'. Assertion Subject: '{subject}'. Assertion Audience: "
                f"'{','.join(audiences)}'. {_WIF_DOCS}",
            )
        same_issuer = [c for c in effective if c.issuer == issuer]
        if not same_issuer:
            raise Aadsts(
                400,
                "invalid_request",
                700211,
                "No matching federated identity record found for presented assertion issuer "
                f"'{issuer}'. {_MISMATCH_HINT}",
            )
        same_subject = [c for c in same_issuer if c.subject == subject]
        if not same_subject:
            if any(c.subject.lower() == subject.lower() for c in same_issuer):
                raise Aadsts(
                    400,
                    "invalid_request",
                    7002138,
                    "No matching federated identity record found for presented assertion subject "
                    f"'{subject}': a federated identity credential matches it only when compared "
                    f"case-insensitively, and subjects are case-sensitive. {_MISMATCH_HINT}",
                )
            raise Aadsts(
                400,
                "invalid_request",
                700213,
                "No matching federated identity record found for presented assertion subject "
                f"'{subject}'. {_MISMATCH_HINT}",
            )
        raise Aadsts(
            400,
            "invalid_request",
            700212,
            "No matching federated identity record found for presented assertion audience "
            f"'{','.join(audiences)}'. {_MISMATCH_HINT}",
        )
