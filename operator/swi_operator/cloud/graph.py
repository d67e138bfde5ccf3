"""Federated credentials of Entra app registrations, through msgraph-sdk.

One ``GraphServiceClient`` for the process (``build_graph_client``), pointed at the configured
base URL, without kiota's retry handler: retries belong to the operator (see
``swi_operator.errors``). Calls go by the application's object id, found once per app id with
``GET /applications(appId='...')`` and remembered (an app id never moves to another object);
concurrent first lookups of one app id share one request.

msgraph-sdk builds the requests, authenticates them and maps errors to ``ODataError``; responses
are read as plain JSON. Its model deserializer runs some 2,400 import statements for every
entity it reads (``Entity.get_field_deserializers``; microsoftgraph/msgraph-sdk-python#584): about
5 ms of CPU per credential, which made listing an identity's credentials the operator's main cost
(bench/onboarding.py, docs/benchmarks.md). The builder for ``applications(appId=...)`` is given
its own path parameters: msgraph's root client hands it the client's shared dict, which the
builder then writes the app id into, so two concurrent lookups could both ask for the last one.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from azure.core.credentials_async import AsyncTokenCredential
from httpx_aiohttp import HttpxAiohttpClient
from kiota_abstractions.base_request_configuration import RequestConfiguration
from kiota_abstractions.default_query_parameters import QueryParameters
from kiota_abstractions.request_information import RequestInformation
from kiota_authentication_azure.azure_identity_authentication_provider import (
    AzureIdentityAuthenticationProvider,
)
from kiota_http.middleware import ParametersNameDecodingHandler, UserAgentHandler
from msgraph.generated.applications_with_app_id.applications_with_app_id_request_builder import (
    ApplicationsWithAppIdRequestBuilder,
)
from msgraph.generated.models.federated_identity_credential import (
    FederatedIdentityCredential as GraphCredential,
)
from msgraph.generated.models.o_data_errors.o_data_error import ODataError
from msgraph.graph_request_adapter import GraphRequestAdapter
from msgraph.graph_service_client import GraphServiceClient
from msgraph_core import GraphClientFactory  # type: ignore[import-untyped]
from msgraph_core.middleware import GraphTelemetryHandler  # type: ignore[import-untyped]

from swi_operator import metrics
from swi_operator.cloud import CallGate, FederatedCredential, Lookups, ResolvedIdentity
from swi_operator.cycle import changed, shared_read
from swi_operator.errors import PermanentError, Reason
from swi_operator.spec import ApplicationRef, IdentityRef

HTTP_TIMEOUT_S = 30.0
_AppQuery = (
    ApplicationsWithAppIdRequestBuilder.ApplicationsWithAppIdRequestBuilderGetQueryParameters
)


def build_graph_client(
    credential: AsyncTokenCredential, base_url: str, scope: str, ca_bundle: Path | None = None
) -> tuple[GraphServiceClient, httpx.AsyncClient]:
    """The process's Graph client and the httpx client to close at shutdown."""
    verify: ssl.SSLContext | bool = (
        ssl.create_default_context(cafile=str(ca_bundle)) if ca_bundle else True
    )
    # msgraph's default chain less what the operator never uses: retries (the operator's own),
    # redirects (Graph does not redirect these calls), the /me rewrite and the inspection
    # handlers. Each handler is a layer with a tracing span for every request; those five were
    # a hundredth of the operator's CPU onboarding 1,000 resources.
    middleware = [ParametersNameDecodingHandler(), UserAgentHandler(), GraphTelemetryHandler()]
    http = GraphClientFactory.create_with_custom_middleware(
        middleware,
        client=HttpxAiohttpClient(
            base_url=base_url,
            timeout=HTTP_TIMEOUT_S,
            verify=verify,
            event_hooks=metrics.httpx_hooks("graph"),
        ),
    )
    host = urlsplit(base_url).hostname or ""
    auth = AzureIdentityAuthenticationProvider(credential, scopes=[scope], allowed_hosts=[host])
    return GraphServiceClient(request_adapter=GraphRequestAdapter(auth, client=http)), http


_ERRORS: dict[str, Any] = {"XXX": ODataError}  # every error status, as msgraph maps them


def _from_graph(item: Mapping[str, Any]) -> FederatedCredential:
    return FederatedCredential(
        name=item.get("name") or "",
        issuer=item.get("issuer") or "",
        subject=item.get("subject") or "",
        audiences=tuple(item.get("audiences") or ()),
        description=item.get("description"),
        id=item.get("id"),
    )


class GraphCredentialStore:
    def __init__(self, client: GraphServiceClient, gate: CallGate, tenant_id: str) -> None:
        self._client = client
        self._gate = gate
        self._tenant_id = tenant_id
        self._apps: Lookups[tuple[str, str]] = Lookups()  # app id -> (object id, display name)

    async def _json(self, request: RequestInformation) -> Any:
        """Send through msgraph (auth, middleware, ODataError on failure); the body as JSON."""
        adapter = self._client.request_adapter
        # kiota types the result with an unbound TypeVar; "bytes" returns the body as bytes.
        raw = await adapter.send_primitive_async(request, "bytes", _ERRORS)  # type: ignore[func-returns-value]
        return json.loads(raw) if raw else None

    async def _look_up(self, client_id: str) -> tuple[str, str]:
        builder = ApplicationsWithAppIdRequestBuilder(
            self._client.request_adapter, dict(self._client.path_parameters), client_id
        )
        query = _AppQuery(select=["id", "appId", "displayName"])
        request = builder.to_get_request_information(RequestConfiguration(query_parameters=query))
        app = await self._gate.call(f"look up application {client_id}", lambda: self._json(request))
        if not isinstance(app, Mapping) or not app.get("id"):
            raise PermanentError(
                Reason.IDENTITY_NOT_FOUND, f"no application with client id {client_id}"
            )
        return str(app["id"]), str(app.get("displayName") or client_id)

    async def resolve(self, ref: IdentityRef) -> ResolvedIdentity:
        assert isinstance(ref, ApplicationRef)
        known = await self._apps.get(ref.client_id, lambda: self._look_up(ref.client_id))
        return ResolvedIdentity(
            ref=ref,
            client_id=ref.client_id,
            tenant_id=ref.tenant_id or self._tenant_id,
            name=known[1],
            object_id=known[0],
        )

    async def list(self, identity: ResolvedIdentity) -> list[FederatedCredential]:
        request = self._client.applications.by_application_id(
            identity.object_id
        ).federated_identity_credentials.to_get_request_information()
        try:
            page = await shared_read(
                ("credentials", identity.object_id),
                lambda: self._gate.call(
                    f"list the federated credentials of application {identity.client_id}",
                    lambda: self._json(request),
                ),
            )
        except PermanentError as err:
            if err.reason is Reason.IDENTITY_NOT_FOUND:
                self._apps.forget(identity.client_id)  # deleted: look it up afresh next time
            raise
        # An application holds at most 20 credentials: one page.
        items = page.get("value") if isinstance(page, Mapping) else None
        return [_from_graph(item) for item in items or []]

    async def upsert(
        self, identity: ResolvedIdentity, credential: FederatedCredential
    ) -> FederatedCredential:
        body = GraphCredential(
            name=credential.name,
            issuer=credential.issuer,
            subject=credential.subject,
            audiences=list(credential.audiences),
            description=credential.description,
        )
        config: RequestConfiguration[QueryParameters] = RequestConfiguration()
        config.headers.add("Prefer", "create-if-missing")
        request = (
            self._client.applications.by_application_id(identity.object_id)
            .federated_identity_credentials_with_name(credential.name)
            .to_patch_request_information(body, config)
        )
        try:
            written = await self._gate.call(
                f"write federated credential {credential.name} on application {identity.client_id}",
                lambda: self._json(request),
                write=True,
            )
        finally:
            changed(("credentials", identity.object_id))  # what a drift cycle read is stale
        # 201 returns the object; 204 (updated) returns nothing, and the id did not change.
        if isinstance(written, Mapping) and written.get("id"):
            return _from_graph(written)
        return credential

    async def delete(self, identity: ResolvedIdentity, name: str) -> None:
        request = (
            self._client.applications.by_application_id(identity.object_id)
            .federated_identity_credentials_with_name(name)
            .to_delete_request_information()
        )

        async def delete_if_present() -> None:
            try:
                await self._client.request_adapter.send_no_response_content_async(request, _ERRORS)
            except ODataError as exc:
                if exc.response_status_code != 404:
                    raise

        try:
            await self._gate.call(
                f"delete federated credential {name} from application {identity.client_id}",
                delete_if_present,
                write=True,
            )
        finally:
            changed(("credentials", identity.object_id))
