"""Microsoft Graph v1.0: applications, service principals and federated identity credentials.

Every route needs a Graph access token from this emulator (tokens.authenticate); the caller's
``roles`` claim decides, as in Graph:
- reading an application or its credentials: ``Application.Read.All``,
  ``Application.ReadWrite.All``, ``Directory.Read.All`` or ``Directory.ReadWrite.All``, or
  ``Application.ReadWrite.OwnedBy`` when the caller owns the app;
- writing credentials: ``Application.ReadWrite.All``, or ``Application.ReadWrite.OwnedBy`` and
  ownership; anything else is 403 ``Authorization_RequestDenied``;
- service principals: the read roles above (``OwnedBy`` sees those of apps it owns).
- creating applications: ``Application.ReadWrite.All`` or ``Application.ReadWrite.OwnedBy``; an
  ``OwnedBy`` caller becomes the new app's owner (else it could not manage what it created);
  deleting one (with its service principal) needs what writing its credentials needs;
  creating a service principal for an app: ``Application.ReadWrite.All``, or ``OwnedBy`` and
  ownership of the app (the caller is added to the owners).
- security groups: create with ``Group.Create``, ``Group.ReadWrite.All`` or
  ``Directory.ReadWrite.All``; read with those or ``GroupMember.Read(Write).All``,
  ``Group.Read.All``, ``Directory.Read.All``; change members with ``GroupMember.ReadWrite.All``,
  ``Group.ReadWrite.All`` or ``Directory.ReadWrite.All``. A service principal that owns a group
  may read it and add or remove its members with no such permission (Graph does so, though its
  permission tables do not say it), but listing the members still needs a read permission.
  ``memberOf``/``transitiveMemberOf`` of a service principal needs ``Application.Read.All`` or one
  of the directory or group read permissions.
Objects of another tenant do not exist for the caller (404 ``Request_ResourceNotFound``).

Applications are addressed by object id or by the ``appId`` alternate key, credentials by id or
by ``(name='...')``; ``PATCH`` by name with ``Prefer: create-if-missing`` is the upsert. Validation
is shared with ARM (state.check_credential); errors are OData bodies so msgraph-sdk raises
``ODataError`` whose ``error.code`` is the Graph code.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from typing import Any

from aiohttp import web

from sandbox.entra.faults import Controls
from sandbox.entra.routing import Handler, PathParams, Router, Surface, base_url
from sandbox.entra.state import (
    MAX_CREDENTIALS,
    MAX_FIELD_LENGTH,
    CredentialProblem,
    Directory,
    FederatedCredential,
    Group,
    Principal,
    check_credential,
)
from sandbox.entra.tokens import (
    GRAPH_AUDIENCES,
    AuthError,
    Caller,
    CallerHandler,
    SigningKey,
    authenticate,
)

READ_ROLES = frozenset(
    {
        "Application.Read.All",
        "Application.ReadWrite.All",
        "Directory.Read.All",
        "Directory.ReadWrite.All",
    }
)
WRITE_ALL_ROLE = "Application.ReadWrite.All"
OWNED_BY_ROLE = "Application.ReadWrite.OwnedBy"
GROUP_CREATE_ROLES = frozenset({"Group.Create", "Group.ReadWrite.All", "Directory.ReadWrite.All"})
GROUP_MEMBER_WRITE_ROLES = frozenset(
    {"GroupMember.ReadWrite.All", "Group.ReadWrite.All", "Directory.ReadWrite.All"}
)
GROUP_READ_ROLES = GROUP_MEMBER_WRITE_ROLES | frozenset(
    {"GroupMember.Read.All", "Group.Read.All", "Directory.Read.All"}
)
MEMBER_OF_ROLES = GROUP_READ_ROLES | READ_ROLES

_APP = r"/v1\.0/applications(?:/(?P<oid>[^/()]+)|\(appId='(?P<appid>[^']*)'\))"
_SP = r"/v1\.0/servicePrincipals(?:/(?P<spid>[^/()]+)|\(appId='(?P<appid>[^']*)'\))"
_FICS = _APP + r"/federatedIdentityCredentials"
_FIC = _FICS + r"(?:/(?P<fid>[^/()]+)|\(name='(?P<fname>[^']*)'\))"
_GROUPS = r"/v1\.0/groups"
_GROUP = _GROUPS + r"/(?P<gid>[^/()]+)"
_MEMBERS = _GROUP + r"/members"
_MEMBER_REF = _MEMBERS + r"/(?P<mid>[^/()]+)/\$ref"
_MEMBER_OF = r"/v1\.0/servicePrincipals/(?P<spid>[^/()]+)/(?P<relation>memberOf|transitiveMemberOf)"
# What an ``@odata.id`` (or an ``…@odata.bind`` entry) may name: a directory object by id.
_REFERENCE = re.compile(
    r"https://[^/]+/v1\.0/(?:directoryObjects|servicePrincipals|groups)/([0-9a-fA-F-]{36})"
)
_FILTER = re.compile(r"\s*(displayName|appId|id)\s+eq\s+'((?:[^']|'')*)'\s*", re.IGNORECASE)

_CREDENTIAL_ERRORS: dict[CredentialProblem, tuple[str, str]] = {
    CredentialProblem.BAD_NAME: (
        "Request_BadRequest",
        "Invalid value specified for property 'name' of resource 'FederatedIdentityCredential'. "
        "A name has 3 to 120 characters: letters, digits, '-' and '_', starting with a letter or "
        "digit.",
    ),
    CredentialProblem.AUDIENCE_COUNT: (
        "Request_BadRequest",
        "Invalid value specified for property 'audiences' of resource "
        "'FederatedIdentityCredential'. Exactly one audience is required.",
    ),
    CredentialProblem.EMPTY_FIELD: (
        "Request_BadRequest",
        "Properties 'issuer', 'subject' and 'audiences' of resource "
        "'FederatedIdentityCredential' must not be empty.",
    ),
    CredentialProblem.FIELD_TOO_LONG: (
        "Request_BadRequest",
        "Properties 'issuer', 'subject' and 'audiences' of resource "
        f"'FederatedIdentityCredential' are limited to {MAX_FIELD_LENGTH} characters.",
    ),
    CredentialProblem.DUPLICATE_ISSUER_SUBJECT: (
        "InvalidFederatedIdentityCredentialValue",
        "The combination of issuer and subject must be unique for the application. "
        "Another federated identity credential already uses them.",
    ),
    CredentialProblem.LIMIT_REACHED: (
        "Request_BadRequest",
        f"The maximum number of federated identity credentials ({MAX_CREDENTIALS}) for this "
        "application has been reached.",
    ),
}


class GraphError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def render_error(request: web.Request, status: int, code: str, message: str) -> web.Response:
    body = {
        "error": {
            "code": code,
            "message": message,
            "innerError": {
                "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S"),
                "request-id": str(uuid.uuid4()),
                "client-request-id": request.headers.get("client-request-id", ""),
            },
        }
    }
    return web.json_response(body, status=status)


def _not_found(key: str) -> GraphError:
    return GraphError(
        404,
        "Request_ResourceNotFound",
        f"Resource '{key}' does not exist or one of its queried reference-property objects are "
        "not present.",
    )


_DENIED = GraphError(
    403, "Authorization_RequestDenied", "Insufficient privileges to complete the operation."
)


def _application_json(app: Principal, domain: str) -> dict[str, Any]:
    return {
        "id": app.app_object_id,
        "appId": app.client_id,
        "displayName": app.name,
        "signInAudience": "AzureADMyOrg",
        "publisherDomain": domain,
        "createdDateTime": app.created or None,
    }


def _service_principal_json(p: Principal) -> dict[str, Any]:
    return {
        "id": p.sp_object_id,
        "appId": p.client_id,
        "displayName": p.name,
        "accountEnabled": True,
        "appOwnerOrganizationId": p.tenant_id,
        "servicePrincipalType": "Application" if p.kind == "application" else "ManagedIdentity",
        "servicePrincipalNames": [p.client_id],
    }


def _group_json(g: Group) -> dict[str, Any]:
    return {
        "id": g.id,
        "createdDateTime": g.created,
        "description": g.description,
        "displayName": g.display_name,
        "groupTypes": [],
        "mail": None,
        "mailEnabled": False,
        "mailNickname": g.mail_nickname,
        "securityEnabled": True,
        "securityIdentifier": None,
        "visibility": None,
    }


def _directory_object_json(obj: Principal | Group) -> dict[str, Any]:
    """A member or ``memberOf`` entry, typed by ``@odata.type`` as Graph lists them."""
    if isinstance(obj, Group):
        return {"@odata.type": "#microsoft.graph.group", **_group_json(obj)}
    return {"@odata.type": "#microsoft.graph.servicePrincipal", **_service_principal_json(obj)}


def _credential_json(c: FederatedCredential) -> dict[str, Any]:
    return {
        "id": c.id,
        "name": c.name,
        "issuer": c.issuer,
        "subject": c.subject,
        "audiences": list(c.audiences),
        "description": c.description,
    }


class GraphService:
    def __init__(self, directory: Directory, key: SigningKey, controls: Controls) -> None:
        self.directory = directory
        self.key = key
        self.controls = controls

    def register(self, router: Router) -> None:
        g = Surface.GRAPH
        router.add(
            g,
            "GET",
            r"/v1\.0/applications",
            "graph.applications.list",
            self._wrap(self.list_applications),
        )
        router.add(
            g,
            "POST",
            r"/v1\.0/applications",
            "graph.applications.create",
            self._wrap(self.create_application),
        )
        router.add(g, "GET", _APP, "graph.applications.get", self._wrap(self.get_application))
        router.add(
            g, "DELETE", _APP, "graph.applications.delete", self._wrap(self.delete_application)
        )
        router.add(
            g,
            "GET",
            r"/v1\.0/servicePrincipals",
            "graph.servicePrincipals.list",
            self._wrap(self.list_service_principals),
        )
        router.add(
            g,
            "POST",
            r"/v1\.0/servicePrincipals",
            "graph.servicePrincipals.create",
            self._wrap(self.create_service_principal),
        )
        router.add(
            g, "GET", _SP, "graph.servicePrincipals.get", self._wrap(self.get_service_principal)
        )
        router.add(
            g, "GET", _MEMBER_OF, "graph.servicePrincipals.memberOf", self._wrap(self.member_of)
        )
        router.add(g, "GET", _GROUPS, "graph.groups.list", self._wrap(self.list_groups))
        router.add(g, "POST", _GROUPS, "graph.groups.create", self._wrap(self.create_group))
        router.add(g, "GET", _GROUP, "graph.groups.get", self._wrap(self.get_group))
        router.add(g, "DELETE", _GROUP, "graph.groups.delete", self._wrap(self.delete_group))
        router.add(g, "GET", _MEMBERS, "graph.groups.members.list", self._wrap(self.list_members))
        router.add(
            g, "POST", _MEMBERS + r"/\$ref", "graph.groups.members.add", self._wrap(self.add_member)
        )
        router.add(
            g, "DELETE", _MEMBER_REF, "graph.groups.members.remove", self._wrap(self.remove_member)
        )
        router.add(g, "GET", _FICS, "graph.fic.list", self._wrap(self.list_credentials))
        router.add(g, "POST", _FICS, "graph.fic.create", self._wrap(self.create_credential))
        router.add(g, "GET", _FIC, "graph.fic.get", self._wrap(self.get_credential))
        router.add(g, "PATCH", _FIC, "graph.fic.update", self._wrap(self.update_credential))
        router.add(g, "DELETE", _FIC, "graph.fic.delete", self._wrap(self.delete_credential))

    def _wrap(self, handler: CallerHandler) -> Handler:
        """Authenticate, run, and turn ``GraphError`` into an OData error body."""

        async def run(request: web.Request, params: PathParams) -> web.StreamResponse:
            try:
                caller = authenticate(
                    request, self.key, self.directory, self.controls.clock, GRAPH_AUDIENCES
                )
                response: web.StreamResponse = await handler(request, params, caller)
                return response
            except AuthError as exc:
                return render_error(request, 401, "InvalidAuthenticationToken", exc.message)
            except GraphError as exc:
                return render_error(request, exc.status, exc.code, exc.message)

        return run

    # -- helpers -----------------------------------------------------------------------------
    def _domain(self, tenant_id: str) -> str:
        tenant = self.directory.tenants.get(tenant_id)
        return tenant.domain if tenant else ""

    @staticmethod
    def _may_read(caller: Caller, p: Principal) -> bool:
        return bool(caller.roles & READ_ROLES) or (
            OWNED_BY_ROLE in caller.roles and caller.principal.sp_object_id in p.owners
        )

    @staticmethod
    def _may_write(caller: Caller, app: Principal) -> bool:
        return WRITE_ALL_ROLE in caller.roles or (
            OWNED_BY_ROLE in caller.roles and caller.principal.sp_object_id in app.owners
        )

    def _application(self, caller: Caller, params: PathParams, *, write: bool) -> Principal:
        if params.get("appid") is not None:
            key = params["appid"]
            app = self.directory.by_client_id(key)
            if app is not None and app.kind != "application":
                app = None
        else:
            key = params["oid"]
            app = self.directory.application(key)
        if app is None or app.tenant_id != caller.tenant_id:
            raise _not_found(key)
        allowed = self._may_write(caller, app) if write else self._may_read(caller, app)
        if not allowed:
            raise _DENIED
        return app

    @staticmethod
    def _credential(
        app: Principal,
        params: PathParams,
        credentials: dict[str, FederatedCredential] | None = None,
    ) -> tuple[str, FederatedCredential | None]:
        """The addressed credential, by name or id, in ``credentials`` (default: the primary's)."""
        held = app.credentials if credentials is None else credentials
        if params.get("fname") is not None:
            return params["fname"], held.get(params["fname"])
        key = params["fid"]
        by_id = next((c for c in held.values() if c.id == key), None)
        return key, by_id or held.get(key)

    def _replica(self, app: Principal) -> dict[str, FederatedCredential]:
        """The app's credentials as a read sees them (``graphReadLagSeconds`` behind)."""
        lag = self.controls.settings.graph_read_lag_seconds
        now = self.controls.clock.real()
        seen: dict[str, FederatedCredential] = self.controls.read_lag.view(
            app.app_object_id or app.client_id, app.credentials, lag, now
        )
        return seen

    def _before_write(self, app: Principal, name: str) -> None:
        """Remember what a write replaces, for reads that lag behind it."""
        if self.controls.settings.graph_read_lag_seconds > 0:
            self.controls.read_lag.wrote(
                app.app_object_id or app.client_id,
                name,
                app.credentials.get(name),
                self.controls.clock.real(),
            )

    @staticmethod
    def _filter(request: web.Request) -> tuple[str, str] | None:
        expression = request.query.get("$filter")
        if expression is None:
            return None
        matched = _FILTER.fullmatch(expression)
        if matched is None:
            raise GraphError(
                400, "Request_UnsupportedQuery", f"Unsupported filter expression: {expression}"
            )
        return matched.group(1).lower(), matched.group(2).replace("''", "'")

    @staticmethod
    async def _body(request: web.Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.text() or "{}")
        except ValueError as exc:
            raise GraphError(
                400, "BadRequest", f"Unable to read JSON request payload: {exc}"
            ) from exc
        if not isinstance(body, dict):
            raise GraphError(400, "BadRequest", "The request payload must be a JSON object.")
        return body

    def _context(self, request: web.Request, fragment: str) -> str:
        return f"{base_url(request)}/v1.0/$metadata#{fragment}"

    def _collection(
        self, request: web.Request, fragment: str, values: list[dict[str, Any]]
    ) -> web.Response:
        """A Graph collection: its context and the objects under ``value``."""
        return web.json_response(
            {"@odata.context": self._context(request, fragment), "value": values}
        )

    # -- applications and service principals -------------------------------------------------
    async def list_applications(
        self, request: web.Request, _: PathParams, caller: Caller
    ) -> web.StreamResponse:
        wanted = self._filter(request)
        if not caller.roles & (READ_ROLES | {OWNED_BY_ROLE}):
            raise _DENIED
        apps = [
            p
            for p in self.directory.principals()
            if p.kind == "application"
            and p.tenant_id == caller.tenant_id
            and self._may_read(caller, p)
        ]
        if wanted is not None:
            field, value = wanted
            apps = [a for a in apps if self._field(a, field, app=True) == value]
        domain = self._domain(caller.tenant_id)
        return self._collection(
            request, "applications", [_application_json(a, domain) for a in apps]
        )

    async def get_application(
        self, request: web.Request, params: PathParams, caller: Caller
    ) -> web.StreamResponse:
        app = self._application(caller, params, write=False)
        body = {
            "@odata.context": self._context(request, "applications/$entity"),
            **_application_json(app, self._domain(app.tenant_id)),
        }
        return web.json_response(body)

    @staticmethod
    def _field(p: Principal, field: str, *, app: bool) -> str | None:
        if field == "displayname":
            return p.name
        if field == "appid":
            return p.client_id
        return p.app_object_id if app else p.sp_object_id

    async def list_service_principals(
        self, request: web.Request, _: PathParams, caller: Caller
    ) -> web.StreamResponse:
        if not caller.roles & (READ_ROLES | {OWNED_BY_ROLE}):
            raise _DENIED
        wanted = self._filter(request)
        found = [
            p
            for p in self.directory.principals()
            if p.tenant_id == caller.tenant_id
            and p.has_service_principal
            and self._may_read(caller, p)
        ]
        if wanted is not None:
            field, value = wanted
            found = [p for p in found if self._field(p, field, app=False) == value]
        return self._collection(
            request, "servicePrincipals", [_service_principal_json(p) for p in found]
        )

    async def get_service_principal(
        self, request: web.Request, params: PathParams, caller: Caller
    ) -> web.StreamResponse:
        if params.get("appid") is not None:
            key = params["appid"]
            found = self.directory.by_client_id(key)
            if found is not None and not found.has_service_principal:
                found = None
        else:
            key = params["spid"]
            found = self.directory.by_sp_object_id(key)
        if found is None or found.tenant_id != caller.tenant_id:
            raise _not_found(key)
        if not self._may_read(caller, found):
            raise _DENIED
        body = {
            "@odata.context": self._context(request, "servicePrincipals/$entity"),
            **_service_principal_json(found),
        }
        return web.json_response(body)

    # -- federated identity credentials ------------------------------------------------------
    async def list_credentials(
        self, request: web.Request, params: PathParams, caller: Caller
    ) -> web.StreamResponse:
        app = self._application(caller, params, write=False)
        fragment = f"applications('{app.app_object_id}')/federatedIdentityCredentials"
        return self._collection(
            request, fragment, [_credential_json(c) for c in self._replica(app).values()]
        )

    async def get_credential(
        self, request: web.Request, params: PathParams, caller: Caller
    ) -> web.StreamResponse:
        app = self._application(caller, params, write=False)
        key, credential = self._credential(app, params, self._replica(app))
        if credential is None:
            raise _not_found(key)
        fragment = f"applications('{app.app_object_id}')/federatedIdentityCredentials/$entity"
        return web.json_response(
            {"@odata.context": self._context(request, fragment), **_credential_json(credential)}
        )

    def _store(self, app: Principal, body: dict[str, Any], name: str) -> FederatedCredential:
        """Validate and write credential ``name`` from a complete body; returns it."""
        audiences = body.get("audiences")
        if not isinstance(audiences, list) or not all(isinstance(a, str) for a in audiences):
            audiences = [] if audiences is None else [str(audiences)]
        issuer, subject = str(body.get("issuer") or ""), str(body.get("subject") or "")
        problem = check_credential(app, name, issuer, subject, audiences)
        if problem is not None:
            code, message = _CREDENTIAL_ERRORS[problem]
            raise GraphError(400, code, message)
        description = body.get("description")
        self._before_write(app, name)
        credential, _ = self.directory.put_credential(
            app,
            name,
            issuer,
            subject,
            audiences,
            None if description is None else str(description),
            self.controls.clock.real(),
        )
        return credential

    def _created(
        self, request: web.Request, app: Principal, credential: FederatedCredential
    ) -> web.StreamResponse:
        location = (
            f"{base_url(request)}/v1.0/applications/{app.app_object_id}"
            f"/federatedIdentityCredentials/{credential.id}"
        )
        fragment = f"applications('{app.app_object_id}')/federatedIdentityCredentials/$entity"
        return web.json_response(
            {"@odata.context": self._context(request, fragment), **_credential_json(credential)},
            status=201,
            headers={"Location": location},
        )

    async def create_credential(
        self, request: web.Request, params: PathParams, caller: Caller
    ) -> web.StreamResponse:
        app = self._application(caller, params, write=True)
        body = await self._body(request)
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise GraphError(400, "Request_BadRequest", "Property 'name' is required.")
        if name in app.credentials:
            # Graph's answer (Azure/azure-dev#1482), decided on the primary: a replica's list may
            # not show the credential yet.
            raise GraphError(
                409,
                "Request_MultipleObjectsWithSameKeyValue",
                f"FederatedIdentityCredential with name {name} already exists.",
            )
        return self._created(request, app, self._store(app, body, name))

    async def update_credential(
        self, request: web.Request, params: PathParams, caller: Caller
    ) -> web.StreamResponse:
        app = self._application(caller, params, write=True)
        key, credential = self._credential(app, params)
        body = await self._body(request)
        if credential is None:
            upsert = "create-if-missing" in request.headers.get("Prefer", "").lower()
            if not upsert or params.get("fname") is None:
                raise _not_found(key)
            if body.get("name", key) != key:
                raise GraphError(
                    400, "Request_BadRequest", "Property 'name' must match the addressed name."
                )
            return self._created(request, app, self._store(app, body, key))
        if "name" in body and body["name"] != credential.name:
            raise GraphError(
                400, "Request_BadRequest", "Property 'name' is read-only and cannot be changed."
            )
        merged = {**_credential_json(credential), **body}
        self._store(app, merged, credential.name)
        return web.Response(status=204)

    async def delete_credential(
        self, request: web.Request, params: PathParams, caller: Caller
    ) -> web.StreamResponse:
        app = self._application(caller, params, write=True)
        key, credential = self._credential(app, params)
        if credential is None:
            raise _not_found(key)
        self._before_write(app, credential.name)
        self.directory.delete_credential(app, credential.name)
        return web.Response(status=204)

    # -- creating applications and service principals ----------------------------------------
    async def create_application(
        self, request: web.Request, _: PathParams, caller: Caller
    ) -> web.StreamResponse:
        if not caller.roles & {WRITE_ALL_ROLE, OWNED_BY_ROLE}:
            raise _DENIED
        body = await self._body(request)
        name = body.get("displayName")
        if not isinstance(name, str) or not name.strip():
            raise GraphError(
                400,
                "Request_BadRequest",
                "Invalid value specified for property 'displayName' of resource 'Application'.",
            )
        # Graph makes an OwnedBy caller the owner of what it creates; an All caller owns nothing.
        owners = {caller.principal.sp_object_id} if WRITE_ALL_ROLE not in caller.roles else set()
        app = self.directory.create_application(caller.tenant_id, name, owners)
        body = {
            "@odata.context": self._context(request, "applications/$entity"),
            **_application_json(app, self._domain(app.tenant_id)),
        }
        location = f"{base_url(request)}/v1.0/applications/{app.app_object_id}"
        return web.json_response(body, status=201, headers={"Location": location})

    async def delete_application(
        self, request: web.Request, params: PathParams, caller: Caller
    ) -> web.StreamResponse:
        """Graph deletes the app's service principal in its home tenant with it."""
        app = self._application(caller, params, write=True)
        self.directory.delete_principal(app)
        return web.Response(status=204)

    async def create_service_principal(
        self, request: web.Request, _: PathParams, caller: Caller
    ) -> web.StreamResponse:
        if not caller.roles & {WRITE_ALL_ROLE, OWNED_BY_ROLE}:
            raise _DENIED
        body = await self._body(request)
        app_id = body.get("appId")
        app = self.directory.by_client_id(str(app_id)) if isinstance(app_id, str) else None
        if app is None or app.kind != "application" or app.tenant_id != caller.tenant_id:
            raise GraphError(
                400,
                "Request_BadRequest",
                f"The appId '{app_id}' of the service principal does not reference a valid "
                "application object.",
            )
        if not self._may_write(caller, app):
            raise _DENIED
        if app.has_service_principal:
            raise GraphError(
                409,
                "Request_MultipleObjectsWithSameKeyValue",
                "The service principal cannot be created, updated, or restored because the "
                f"service principal name {app.client_id} is already in use.",
            )
        owners = {caller.principal.sp_object_id} if WRITE_ALL_ROLE not in caller.roles else set()
        self.directory.create_service_principal(app, owners)
        body = {
            "@odata.context": self._context(request, "servicePrincipals/$entity"),
            **_service_principal_json(app),
        }
        location = f"{base_url(request)}/v1.0/servicePrincipals/{app.sp_object_id}"
        return web.json_response(body, status=201, headers={"Location": location})

    # -- security groups ---------------------------------------------------------------------
    def _group(self, caller: Caller, params: PathParams, roles: frozenset[str]) -> Group:
        """The addressed group, if ``caller`` holds one of ``roles`` or owns it (else 403)."""
        group = self.directory.group(params["gid"])
        if group is None or group.tenant_id != caller.tenant_id:
            raise _not_found(params["gid"])
        if not (caller.roles & roles or caller.principal.sp_object_id in group.owners):
            raise _DENIED
        return group

    def _referenced(self, caller: Caller, reference: object) -> Principal | Group:
        """The directory object an ``@odata.id`` URL names (400 if malformed, 404 if absent)."""
        matched = _REFERENCE.fullmatch(reference) if isinstance(reference, str) else None
        if matched is None:
            raise GraphError(
                400,
                "Request_BadRequest",
                f"Invalid object identifier '{reference}'. The @odata.id must be a URL such as "
                "https://graph.microsoft.com/v1.0/directoryObjects/{id}.",
            )
        found = self.directory.directory_object(matched.group(1))
        if found is None or found.tenant_id != caller.tenant_id:
            raise _not_found(matched.group(1))
        return found

    def _check_may_bind(self, caller: Caller, obj: Principal | Group) -> None:
        """Graph: a ``Group.Create`` app may name itself owner or member of the group it creates,
        and others only if it may read them (e.g. ``Application.Read.All`` for service
        principals); ``Group.ReadWrite.All``/``Directory.ReadWrite.All`` may name anyone."""
        if caller.roles & {"Group.ReadWrite.All", "Directory.ReadWrite.All"}:
            return
        if isinstance(obj, Group):
            allowed = bool(caller.roles & GROUP_READ_ROLES)
        else:
            allowed = obj is caller.principal or self._may_read(caller, obj)
        if not allowed:
            raise _DENIED

    @staticmethod
    def _object_id(obj: Principal | Group) -> str:
        return obj.id if isinstance(obj, Group) else obj.sp_object_id

    def _group_entity(self, request: web.Request, group: Group) -> dict[str, Any]:
        return {"@odata.context": self._context(request, "groups/$entity"), **_group_json(group)}

    async def list_groups(
        self, request: web.Request, _: PathParams, caller: Caller
    ) -> web.StreamResponse:
        if not caller.roles & GROUP_READ_ROLES:
            raise _DENIED
        wanted = self._filter(request)
        groups = [g for g in self.directory.groups.values() if g.tenant_id == caller.tenant_id]
        if wanted is not None:
            field, value = wanted
            groups = [
                g for g in groups if (g.display_name if field == "displayname" else g.id) == value
            ]
        return self._collection(request, "groups", [_group_json(g) for g in groups])

    async def create_group(
        self, request: web.Request, _: PathParams, caller: Caller
    ) -> web.StreamResponse:
        if not caller.roles & GROUP_CREATE_ROLES:
            raise _DENIED
        body = await self._body(request)
        for prop in ("displayName", "mailNickname"):
            value = body.get(prop)
            if not isinstance(value, str) or not value.strip():
                raise GraphError(
                    400,
                    "Request_BadRequest",
                    f"Invalid value specified for property '{prop}' of resource 'Group'.",
                )
        if body.get("mailEnabled") is not False or body.get("securityEnabled") is not True:
            # Only security groups are emulated; the wording is the emulator's own.
            raise GraphError(
                400,
                "Request_BadRequest",
                "Only security groups can be created here: mailEnabled must be false and "
                "securityEnabled true (Microsoft 365 and mail-enabled groups are not emulated).",
            )
        if body.get("groupTypes"):
            raise GraphError(
                400,
                "Request_BadRequest",
                "Only security groups can be created here: groupTypes must be empty.",
            )
        bound: dict[str, set[str]] = {}
        for relation in ("owners", "members"):
            references = body.get(f"{relation}@odata.bind") or []
            if not isinstance(references, list):
                raise GraphError(
                    400, "Request_BadRequest", f"'{relation}@odata.bind' must be a list of URLs."
                )
            objects = [self._referenced(caller, r) for r in references]
            for obj in objects:
                self._check_may_bind(caller, obj)
            bound[relation] = {self._object_id(obj) for obj in objects}
        description = body.get("description")
        group = self.directory.create_group(
            caller.tenant_id,
            str(body["displayName"]),
            str(body["mailNickname"]),
            None if description is None else str(description),
            bound["owners"],
            bound["members"],
            dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
        location = f"{base_url(request)}/v1.0/groups/{group.id}"
        return web.json_response(
            self._group_entity(request, group), status=201, headers={"Location": location}
        )

    async def get_group(
        self, request: web.Request, params: PathParams, caller: Caller
    ) -> web.StreamResponse:
        group = self._group(caller, params, GROUP_READ_ROLES)
        return web.json_response(self._group_entity(request, group))

    async def delete_group(
        self, request: web.Request, params: PathParams, caller: Caller
    ) -> web.StreamResponse:
        group = self._group(
            caller, params, frozenset({"Group.ReadWrite.All", "Directory.ReadWrite.All"})
        )
        self.directory.delete_group(group)
        return web.Response(status=204)

    async def list_members(
        self, request: web.Request, params: PathParams, caller: Caller
    ) -> web.StreamResponse:
        group = self._group(caller, params, GROUP_READ_ROLES)
        if not caller.roles & GROUP_READ_ROLES:
            raise _DENIED  # owning a group does not let an app list its members
        members = [
            found
            for found in (self.directory.directory_object(m) for m in sorted(group.members))
            if found is not None
        ]
        return self._collection(
            request, "directoryObjects", [_directory_object_json(m) for m in members]
        )

    async def add_member(
        self, request: web.Request, params: PathParams, caller: Caller
    ) -> web.StreamResponse:
        group = self._group(caller, params, GROUP_MEMBER_WRITE_ROLES)
        body = await self._body(request)
        member_id = self._object_id(self._referenced(caller, body.get("@odata.id")))
        if member_id.lower() in {m.lower() for m in group.members}:
            raise GraphError(
                400,
                "Request_BadRequest",
                "One or more added object references already exist for the following modified "
                "properties: 'members'.",
            )
        if member_id.lower() == group.id.lower():
            raise GraphError(
                400, "Request_BadRequest", "A group cannot be added as a member of itself."
            )
        group.members.add(member_id)
        return web.Response(status=204)

    async def remove_member(
        self, request: web.Request, params: PathParams, caller: Caller
    ) -> web.StreamResponse:
        group = self._group(caller, params, GROUP_MEMBER_WRITE_ROLES)
        member = next((m for m in group.members if m.lower() == params["mid"].lower()), None)
        if member is None:
            raise _not_found(params["mid"])
        group.members.discard(member)
        return web.Response(status=204)

    async def member_of(
        self, request: web.Request, params: PathParams, caller: Caller
    ) -> web.StreamResponse:
        if not caller.roles & MEMBER_OF_ROLES:
            raise _DENIED
        found = self.directory.by_sp_object_id(params["spid"])
        if found is None or found.tenant_id != caller.tenant_id:
            raise _not_found(params["spid"])
        transitive = params["relation"].lower() == "transitivememberof"
        groups = self.directory.member_of(found.sp_object_id, transitive=transitive)
        return self._collection(
            request, "directoryObjects", [_directory_object_json(g) for g in groups]
        )
