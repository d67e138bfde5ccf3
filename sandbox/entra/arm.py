"""ARM: user-assigned managed identities and their federated identity credentials.

Request flow, in ARM's order: ``api-version`` present and supported (400), bearer token for the
management audience (401), subscription and resource group exist (404), the identity exists (404;
not for a PUT, which creates it), the caller has a role on it (403 ``AuthorizationFailed``: Managed
Identity Contributor on the identity, the world file's ``writers``, or on its whole resource group,
``resourceGroups[].managedIdentityContributors``), then the operation.

Identities themselves are created by PUT (201; 200 when it exists, with its location and tags
replaced and its ids kept, as ARM's create-or-update does) and removed by DELETE (200; 204 when
absent). A deleted identity's service principal goes with it: its federated credentials and its
group memberships are gone, and it can no longer sign in.

Credential writes (PUT and DELETE) take ``Settings.arm_write_seconds``; a write that starts while
another write on the same identity is in flight is refused with 409
``ConcurrentFederatedIdentityCredentialsWritesForSingleManagedIdentity``, as ARM does. Writes on
different identities proceed in parallel. Validation is shared with Graph (state.check_credential)
but worded as the managed identity resource provider words it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from sandbox.entra.faults import Controls
from sandbox.entra.routing import Handler, PathParams, Router, Surface, base_url
from sandbox.entra.state import (
    MAX_CREDENTIALS,
    MAX_FIELD_LENGTH,
    CredentialProblem,
    Directory,
    FederatedCredential,
    Principal,
    check_credential,
)
from sandbox.entra.tokens import (
    ARM_AUDIENCES,
    AuthError,
    Caller,
    CallerHandler,
    SigningKey,
    authenticate,
)

IDENTITY_API_VERSIONS = frozenset(
    {
        "2015-08-31-preview",
        "2018-11-30",
        "2021-09-30-preview",
        "2022-01-31-preview",
        "2023-01-31",
        "2023-07-31-preview",
        "2024-11-30",
        "2025-01-31-preview",
    }
)
CREDENTIAL_API_VERSIONS = IDENTITY_API_VERSIONS - {"2015-08-31-preview", "2018-11-30"}
IDENTITY_TYPE = "Microsoft.ManagedIdentity/userAssignedIdentities"
CREDENTIAL_TYPE = f"{IDENTITY_TYPE}/federatedIdentityCredentials"

_SUB = r"/subscriptions/(?P<sub>[^/]+)"
_RG = _SUB + r"/resourceGroups/(?P<rg>[^/]+)"
_PROVIDER = r"/providers/Microsoft\.ManagedIdentity/userAssignedIdentities"
_IDENTITY = _RG + _PROVIDER + r"/(?P<name>[^/]+)"
_CREDENTIALS = _IDENTITY + r"/federatedIdentityCredentials"
# Azure's rule for user-assigned identity names: 3-128 characters, letters, digits, '-' and '_',
# starting with a letter or digit.
_IDENTITY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{2,127}")
_CREDENTIAL = _CREDENTIALS + r"/(?P<fic>[^/]+)"

_CREDENTIAL_ERRORS: dict[CredentialProblem, str] = {
    CredentialProblem.BAD_NAME: "Federated Identity Credential name '{name}' is invalid.",
    CredentialProblem.AUDIENCE_COUNT: "Federated identity credentials must have exactly one "
    "audience.",
    CredentialProblem.EMPTY_FIELD: "Federated identity credential issuer, subject and audience "
    "must not be empty.",
    CredentialProblem.FIELD_TOO_LONG: "Federated identity credential issuer, subject and "
    f"audience are limited to {MAX_FIELD_LENGTH} characters.",
    CredentialProblem.DUPLICATE_ISSUER_SUBJECT: "Issuer and subject combination already exists "
    "for this Managed Identity.",
    CredentialProblem.LIMIT_REACHED: "The number of Federated Identity Credentials for this "
    f"Managed Identity has reached the maximum of {MAX_CREDENTIALS}.",
}


class ArmError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def render_error(request: web.Request, status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


_AUTH_CODES = {
    "missing": "AuthenticationFailed",
    "expired": "ExpiredAuthenticationToken",
    "audience": "InvalidAuthenticationToken",
    "invalid": "InvalidAuthenticationToken",
}


async def _request_json(request: web.Request) -> Any:
    """The request's JSON body (``{}`` when empty), or ARM's 400 for one that does not parse."""
    try:
        return json.loads(await request.text() or "{}")
    except ValueError as exc:
        raise ArmError(
            400, "InvalidRequestContent", f"The request content was invalid: {exc}"
        ) from exc


def _identity_json(sub: str, identity: Principal) -> dict[str, Any]:
    return {
        "id": _identity_id(sub, identity),
        "name": identity.name,
        "type": IDENTITY_TYPE,
        "location": identity.location,
        "tags": dict(identity.tags),
        "properties": {
            "tenantId": identity.tenant_id,
            "principalId": identity.sp_object_id,
            "clientId": identity.client_id,
            "isolationScope": "None",
        },
    }


def _identity_id(sub: str, identity: Principal) -> str:
    return (
        f"/subscriptions/{sub}/resourceGroups/{identity.resource_group}/providers/"
        f"{IDENTITY_TYPE}/{identity.name}"
    )


def _credential_json(sub: str, identity: Principal, c: FederatedCredential) -> dict[str, Any]:
    return {
        "id": f"{_identity_id(sub, identity)}/federatedIdentityCredentials/{c.name}",
        "name": c.name,
        "type": CREDENTIAL_TYPE,
        "properties": {"issuer": c.issuer, "subject": c.subject, "audiences": list(c.audiences)},
    }


class ArmService:
    def __init__(self, directory: Directory, key: SigningKey, controls: Controls) -> None:
        self.directory = directory
        self.key = key
        self.controls = controls
        self._writing: set[str] = set()  # client ids of identities with a write in flight

    def register(self, router: Router) -> None:
        a = Surface.ARM
        ids, creds = IDENTITY_API_VERSIONS, CREDENTIAL_API_VERSIONS
        router.add(
            a, "GET", _SUB + _PROVIDER, "arm.identities.list", self._wrap(self.list_identities, ids)
        )
        router.add(
            a, "GET", _RG + _PROVIDER, "arm.identities.list", self._wrap(self.list_identities, ids)
        )
        router.add(a, "GET", _IDENTITY, "arm.identities.get", self._wrap(self.get_identity, ids))
        router.add(a, "PUT", _IDENTITY, "arm.identities.put", self._wrap(self.put_identity, ids))
        router.add(
            a, "DELETE", _IDENTITY, "arm.identities.delete", self._wrap(self.delete_identity, ids)
        )
        router.add(a, "GET", _CREDENTIALS, "arm.fic.list", self._wrap(self.list_credentials, creds))
        router.add(a, "GET", _CREDENTIAL, "arm.fic.get", self._wrap(self.get_credential, creds))
        router.add(a, "PUT", _CREDENTIAL, "arm.fic.put", self._wrap(self.put_credential, creds))
        router.add(
            a, "DELETE", _CREDENTIAL, "arm.fic.delete", self._wrap(self.delete_credential, creds)
        )

    def _wrap(self, handler: CallerHandler, versions: frozenset[str]) -> Handler:
        async def run(request: web.Request, params: PathParams) -> web.StreamResponse:
            try:
                self._check_api_version(request, versions)
                caller = self._authenticate(request)
                self._check_scope(caller, params)
                response: web.StreamResponse = await handler(request, params, caller)
                return response
            except ArmError as exc:
                return render_error(request, exc.status, exc.code, exc.message)

        return run

    # -- checks ------------------------------------------------------------------------------
    @staticmethod
    def _check_api_version(request: web.Request, versions: frozenset[str]) -> None:
        version = request.query.get("api-version")
        if not version:
            raise ArmError(
                400,
                "MissingApiVersionParameter",
                "The api-version query parameter (?api-version=) is required for all requests.",
            )
        if version not in versions:
            raise ArmError(
                400,
                "InvalidApiVersionParameter",
                f"The api-version '{version}' is invalid. The supported versions are "
                f"'{','.join(sorted(versions, reverse=True))}'.",
            )

    def _subscription_tenant(self) -> str:
        return self.directory.world.tenants[0].id

    def _authenticate(self, request: web.Request) -> Caller:
        try:
            caller = authenticate(
                request, self.key, self.directory, self.controls.clock, ARM_AUDIENCES
            )
        except AuthError as exc:
            message = (
                "Authentication failed. The 'Authorization' header is missing."
                if exc.kind == "missing"
                else f"The access token is invalid: {exc.message}"
            )
            raise ArmError(401, _AUTH_CODES[exc.kind], message) from exc
        tenant = self._subscription_tenant()
        if caller.tenant_id != tenant:
            raise ArmError(
                401,
                "InvalidAuthenticationTokenTenant",
                "The access token is from the wrong issuer "
                f"'https://sts.windows.net/{caller.tenant_id}/'. It must match the tenant "
                f"'https://sts.windows.net/{tenant}/' associated with this subscription.",
            )
        return caller

    def _check_scope(self, caller: Caller, params: PathParams) -> None:
        sub = params["sub"]
        if sub.lower() != self.directory.world.subscription_id.lower():
            raise ArmError(
                404, "SubscriptionNotFound", f"The subscription '{sub}' could not be found."
            )
        rg = params.get("rg")
        if rg is not None and rg.lower() not in self.directory.resource_groups():
            raise ArmError(
                404, "ResourceGroupNotFound", f"Resource group '{rg}' could not be found."
            )

    def _identity(self, caller: Caller, params: PathParams, action: str) -> Principal:
        identity = self.directory.managed_identity(params["rg"], params["name"])
        if identity is None:
            raise ArmError(
                404,
                "ResourceNotFound",
                f"The Resource '{IDENTITY_TYPE}/{params['name']}' under resource group "
                f"'{params['rg']}' was not found. For more details please go to "
                "https://aka.ms/ARMResourceNotFoundFix",
            )
        self._authorize(caller, params, action)
        return identity

    def _authorize(self, caller: Caller, params: PathParams, action: str) -> None:
        """403 unless the caller holds Managed Identity Contributor on the identity's scope."""
        oid = caller.principal.sp_object_id
        if self.directory.may_write_identity(oid, params["rg"], params["name"]):
            return
        identity = self.directory.managed_identity(params["rg"], params["name"])
        scope = (
            _identity_id(params["sub"], identity)
            if identity is not None
            else f"/subscriptions/{params['sub']}/resourceGroups/{params['rg']}/providers/"
            f"{IDENTITY_TYPE}/{params['name']}"
        )
        raise ArmError(
            403,
            "AuthorizationFailed",
            f"The client '{oid}' with object id '{oid}' does not have authorization to "
            f"perform action '{action}' over scope '{scope}' or the scope is invalid. If "
            "access was recently granted, please refresh your credentials.",
        )

    # -- identities --------------------------------------------------------------------------
    async def list_identities(
        self, request: web.Request, params: PathParams, caller: Caller
    ) -> web.StreamResponse:
        visible = [
            i
            for i in self.directory.managed_identities(params.get("rg"))
            if self.directory.may_write_identity(
                caller.principal.sp_object_id, i.resource_group or "", i.name
            )
        ]
        return web.json_response({"value": [_identity_json(params["sub"], i) for i in visible]})

    async def get_identity(
        self, request: web.Request, params: PathParams, caller: Caller
    ) -> web.StreamResponse:
        identity = self._identity(caller, params, f"{IDENTITY_TYPE}/read")
        return web.json_response(_identity_json(params["sub"], identity))

    async def put_identity(
        self, request: web.Request, params: PathParams, caller: Caller
    ) -> web.StreamResponse:
        self._authorize(caller, params, f"{IDENTITY_TYPE}/write")
        name = params["name"]
        if _IDENTITY_NAME.fullmatch(name) is None:
            raise ArmError(
                400,
                "InvalidResourceName",
                f"Resource name '{name}' is invalid. The name can be 3 to 128 characters long: "
                "letters, digits, '-' and '_', starting with a letter or digit.",
            )
        body = await _request_json(request)
        location = body.get("location") if isinstance(body, dict) else None
        if not isinstance(location, str) or not location:
            raise ArmError(
                400, "LocationRequired", "The location property is required for this definition."
            )
        tags = body.get("tags") or {}
        if not isinstance(tags, dict):
            raise ArmError(400, "InvalidRequestContent", "The 'tags' property must be an object.")
        tags = {str(k): str(v) for k, v in tags.items()}
        identity = self.directory.managed_identity(params["rg"], name)
        if identity is not None:
            identity.location, identity.tags = location, tags
            return web.json_response(_identity_json(params["sub"], identity), status=200)
        created = self.directory.create_managed_identity(
            self._subscription_tenant(),
            self._resource_group_name(params["rg"]),
            name,
            location,
            tags,
        )
        return web.json_response(_identity_json(params["sub"], created), status=201)

    def _resource_group_name(self, asked: str) -> str:
        """The resource group's name as the world spells it (ARM keeps the created case)."""
        for group in self.directory.world.resource_groups:
            if group.name.lower() == asked.lower():
                return group.name
        for identity in self.directory.managed_identities():
            if (identity.resource_group or "").lower() == asked.lower():
                return identity.resource_group or asked
        return asked

    async def delete_identity(
        self, request: web.Request, params: PathParams, caller: Caller
    ) -> web.StreamResponse:
        self._authorize(caller, params, f"{IDENTITY_TYPE}/delete")
        identity = self.directory.managed_identity(params["rg"], params["name"])
        if identity is None:
            return web.Response(status=204)
        self.directory.delete_principal(identity)
        return web.Response(status=200)

    # -- credentials -------------------------------------------------------------------------
    async def list_credentials(
        self, request: web.Request, params: PathParams, caller: Caller
    ) -> web.StreamResponse:
        identity = self._identity(caller, params, f"{CREDENTIAL_TYPE}/read")
        credentials = list(identity.credentials.values())
        try:
            start = int(request.query.get("$skiptoken", "0"))
            top = int(request.query.get("$top", str(len(credentials) or 1)))
        except ValueError as exc:
            raise ArmError(400, "BadRequest", f"Invalid $top or $skiptoken: {exc}") from exc
        page = credentials[start : start + max(top, 1)]
        body: dict[str, Any] = {
            "value": [_credential_json(params["sub"], identity, c) for c in page]
        }
        if start + len(page) < len(credentials):
            query = urlencode(
                {
                    "api-version": request.query["api-version"],
                    "$top": str(top),
                    "$skiptoken": str(start + len(page)),
                }
            )
            body["nextLink"] = f"{base_url(request)}{request.path}?{query}"
        return web.json_response(body)

    async def get_credential(
        self, request: web.Request, params: PathParams, caller: Caller
    ) -> web.StreamResponse:
        identity = self._identity(caller, params, f"{CREDENTIAL_TYPE}/read")
        credential = identity.credentials.get(params["fic"])
        if credential is None:
            raise ArmError(
                404,
                "NotFound",
                f"Federated Identity Credential '{params['fic']}' was not found for the managed "
                f"identity '{identity.name}'.",
            )
        return web.json_response(_credential_json(params["sub"], identity, credential))

    @contextlib.asynccontextmanager
    async def _write_slot(self, identity: Principal) -> AsyncIterator[None]:
        """Hold the identity's only write slot (409 if taken) for the configured write time."""
        if identity.client_id in self._writing:
            raise ArmError(
                409,
                "ConcurrentFederatedIdentityCredentialsWritesForSingleManagedIdentity",
                "Too many Federated Identity Credentials are written concurrently for the managed "
                f"identity '{identity.name}'. Concurrent Federated Identity Credentials writes "
                "under the same managed identity are not supported.",
            )
        self._writing.add(identity.client_id)
        try:
            delay = self.controls.settings.arm_write_seconds
            if delay > 0:
                await asyncio.sleep(delay)
            yield
        finally:
            self._writing.discard(identity.client_id)

    async def put_credential(
        self, request: web.Request, params: PathParams, caller: Caller
    ) -> web.StreamResponse:
        identity = self._identity(caller, params, f"{CREDENTIAL_TYPE}/write")
        body = await _request_json(request)
        properties = body.get("properties") if isinstance(body, dict) else None
        if not isinstance(properties, dict):
            raise ArmError(400, "BadRequest", "The request body must contain 'properties'.")
        audiences = properties.get("audiences")
        if not isinstance(audiences, list):
            audiences = [] if audiences is None else [audiences]
        audiences = [str(a) for a in audiences]
        issuer, subject = str(properties.get("issuer") or ""), str(properties.get("subject") or "")
        name = params["fic"]
        async with self._write_slot(identity):
            problem = check_credential(identity, name, issuer, subject, audiences)
            if problem is not None:
                raise ArmError(400, "BadRequest", _CREDENTIAL_ERRORS[problem].format(name=name))
            credential, created = self.directory.put_credential(
                identity, name, issuer, subject, audiences, None, self.controls.clock.real()
            )
        return web.json_response(
            _credential_json(params["sub"], identity, credential), status=201 if created else 200
        )

    async def delete_credential(
        self, request: web.Request, params: PathParams, caller: Caller
    ) -> web.StreamResponse:
        identity = self._identity(caller, params, f"{CREDENTIAL_TYPE}/delete")
        async with self._write_slot(identity):
            removed = self.directory.delete_credential(identity, params["fic"])
        return web.Response(status=200 if removed else 204)
