"""Federated credentials of Entra app registrations, through msgraph-sdk.

One ``GraphServiceClient`` for the process (``build_graph_client``), pointed at the configured
base URL, with kiota's retry handler switched off: retries belong to the operator (see
``swi_operator.errors``). Calls go by the application's object id, found once per app id with
``GET /applications(appId='...')`` and remembered (an app id never moves to another object).
"""

from __future__ import annotations

import ssl
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from azure.core.credentials_async import AsyncTokenCredential
from kiota_abstractions.base_request_configuration import RequestConfiguration
from kiota_abstractions.default_query_parameters import QueryParameters
from kiota_authentication_azure.azure_identity_authentication_provider import (
    AzureIdentityAuthenticationProvider,
)
from kiota_http.middleware.options import RetryHandlerOption
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

from swi_operator.cloud import CallGate, FederatedCredential, ResolvedIdentity
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
    http = GraphClientFactory.create_with_default_middleware(
        client=httpx.AsyncClient(base_url=base_url, timeout=HTTP_TIMEOUT_S, verify=verify),
        options={RetryHandlerOption.get_key(): RetryHandlerOption(max_retries=0)},
    )
    host = urlsplit(base_url).hostname or ""
    auth = AzureIdentityAuthenticationProvider(credential, scopes=[scope], allowed_hosts=[host])
    return GraphServiceClient(request_adapter=GraphRequestAdapter(auth, client=http)), http


def _from_graph(item: GraphCredential) -> FederatedCredential:
    return FederatedCredential(
        name=item.name or "",
        issuer=item.issuer or "",
        subject=item.subject or "",
        audiences=tuple(item.audiences or ()),
        description=item.description,
        id=item.id,
    )


class GraphCredentialStore:
    def __init__(self, client: GraphServiceClient, gate: CallGate, tenant_id: str) -> None:
        self._client = client
        self._gate = gate
        self._tenant_id = tenant_id
        self._apps: dict[str, tuple[str, str]] = {}  # app id -> (object id, display name)

    async def resolve(self, ref: IdentityRef) -> ResolvedIdentity:
        assert isinstance(ref, ApplicationRef)
        known = self._apps.get(ref.client_id)
        if known is None:
            query = _AppQuery(select=["id", "appId", "displayName"])
            app = await self._gate.call(
                f"look up application {ref.client_id}",
                lambda: self._client.applications_with_app_id(ref.client_id).get(
                    RequestConfiguration(query_parameters=query)
                ),
            )
            if app is None or not app.id:
                raise PermanentError(
                    Reason.IDENTITY_NOT_FOUND, f"no application with client id {ref.client_id}"
                )
            known = (app.id, app.display_name or ref.client_id)
            self._apps[ref.client_id] = known
        return ResolvedIdentity(
            ref=ref,
            client_id=ref.client_id,
            tenant_id=ref.tenant_id or self._tenant_id,
            name=known[1],
            object_id=known[0],
        )

    async def list(self, identity: ResolvedIdentity) -> list[FederatedCredential]:
        credentials = self._client.applications.by_application_id(
            identity.object_id
        ).federated_identity_credentials
        try:
            page = await self._gate.call(
                f"list the federated credentials of application {identity.client_id}",
                credentials.get,
            )
        except PermanentError as err:
            if err.reason is Reason.IDENTITY_NOT_FOUND:
                self._apps.pop(identity.client_id, None)  # deleted: look it up afresh next time
            raise
        # An application holds at most 20 credentials: one page.
        return [_from_graph(item) for item in (page.value if page and page.value else [])]

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
        builder = self._client.applications.by_application_id(
            identity.object_id
        ).federated_identity_credentials_with_name(credential.name)
        written = await self._gate.call(
            f"write federated credential {credential.name} on application {identity.client_id}",
            lambda: builder.patch(body, config),
        )
        # 201 returns the object; 204 (updated) returns nothing, and the id did not change.
        return _from_graph(written) if written is not None and written.id else credential

    async def delete(self, identity: ResolvedIdentity, name: str) -> None:
        builder = self._client.applications.by_application_id(
            identity.object_id
        ).federated_identity_credentials_with_name(name)

        async def delete_if_present() -> None:
            try:
                await builder.delete()
            except ODataError as exc:
                if exc.response_status_code != 404:
                    raise

        await self._gate.call(
            f"delete federated credential {name} from application {identity.client_id}",
            delete_if_present,
        )
