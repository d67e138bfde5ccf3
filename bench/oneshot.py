"""The one-shot way, scripted: the seed's steps for one service account after another.

What a platform team does today without the operator, the way ``azwi serviceaccount create``
and ``az identity federated-credential create`` do it: for each service account, find the
identity (Graph: the application by display name and its service principal, as azwi's ``app``
and ``service-principal`` phases do; ARM: the managed identity), add the federated credential
(Graph POST, or ARM PUT), create the annotated service account, label the workload's pod
template, and (with ``sql``) run the seed's Step 2 as the server's Entra admin, as ``sqlcmd``
would: connect, create the contained user unless it exists, add it to the role. Calls are
sequential, with the SDKs' own retries (they honour 429's Retry-After). Nothing verifies the
chain afterwards (the operator's Verified probe has no counterpart here).

It is a generous baseline: one process for the whole fleet, so one token per service instead of
one per CLI invocation, and no CLI start-up (azwi and az cost about a second each per call).
"""

from __future__ import annotations

import ssl
import struct
import time
from collections.abc import Sequence
from typing import Any

import httpx

from bench.harness import (
    AUDIENCE,
    CLIENT_ID_ANNOTATION,
    SQL_DATABASE,
    SQL_ROLES,
    SQL_SCOPE,
    TENANT_ID_ANNOTATION,
    USE_LABEL,
    Member,
    Sandbox,
)

GRAPH_SCOPE = "https://graph.microsoft.com/.default"
ARM_SCOPE = "https://management.azure.com/.default"
ARM_API_VERSION = "2024-11-30"
SQL_COPT_SS_ACCESS_TOKEN = 1256  # pyodbc: the access token struct, as in the seed


def credential_name(m: Member) -> str:
    return f"{m.namespace}-{m.service_account}"


class OneShot:
    """Onboards members one by one, as the tenant's administrator (a person with the CLI)."""

    def __init__(self, sandbox: Sandbox, sql: bool = False) -> None:
        from azure.identity import ClientSecretCredential
        from azure.identity.aio import ClientSecretCredential as AsyncClientSecretCredential
        from azure.mgmt.msi import ManagedServiceIdentityClient
        from kiota_authentication_azure.azure_identity_authentication_provider import (
            AzureIdentityAuthenticationProvider,
        )
        from msgraph.graph_request_adapter import GraphRequestAdapter
        from msgraph.graph_service_client import GraphServiceClient
        from msgraph_core import GraphClientFactory  # type: ignore[import-untyped]

        env, world = sandbox.env, sandbox.world
        self._issuer = env["SANDBOX_ISSUER"]
        self._tenant = world.tenant
        authority = env["AZURE_AUTHORITY_HOST"]
        self._async_credential = AsyncClientSecretCredential(
            world.tenant,
            world.admin_client_id,
            world.admin_secret,
            authority=authority,
            disable_instance_discovery=True,
            connection_verify=str(sandbox.ca),
        )
        self._http = GraphClientFactory.create_with_default_middleware(
            client=httpx.AsyncClient(
                base_url=env["SANDBOX_GRAPH_URL"],
                verify=ssl.create_default_context(cafile=str(sandbox.ca)),
                timeout=60,
            )
        )
        auth = AzureIdentityAuthenticationProvider(
            self._async_credential, scopes=[GRAPH_SCOPE], allowed_hosts=["localhost"]
        )
        self._graph = GraphServiceClient(
            request_adapter=GraphRequestAdapter(auth, client=self._http)
        )
        self._credential = ClientSecretCredential(
            world.tenant,
            world.admin_client_id,
            world.admin_secret,
            authority=authority,
            disable_instance_discovery=True,
            connection_verify=str(sandbox.ca),
        )
        self._arm = ManagedServiceIdentityClient(
            self._credential,
            world.subscription,
            api_version=ARM_API_VERSION,
            base_url=env["SANDBOX_ARM_URL"],
            credential_scopes=[ARM_SCOPE],
            connection_verify=str(sandbox.ca),
        )
        self._core = sandbox.api("CoreV1Api")
        self._apps = sandbox.api("AppsV1Api")
        self._sql = sql
        self._sql_server = sandbox.sql_server
        # The SQL server's Entra admin (sandbox/world.yaml: the operator's app).
        self._sql_admin = ClientSecretCredential(
            world.tenant,
            world.operator_client_id,
            world.operator_secret,
            authority=authority,
            disable_instance_discovery=True,
            connection_verify=str(sandbox.ca),
        )

    async def close(self) -> None:
        await self._http.aclose()
        await self._async_credential.close()
        self._arm.close()  # type: ignore[no-untyped-call]
        self._credential.close()
        self._sql_admin.close()

    async def _app_credential(self, m: Member) -> str:
        """azwi's phases: the application by name, its service principal, the credential."""
        from kiota_abstractions.base_request_configuration import RequestConfiguration
        from msgraph.generated.applications.applications_request_builder import (
            ApplicationsRequestBuilder,
        )
        from msgraph.generated.models.federated_identity_credential import (
            FederatedIdentityCredential,
        )
        from msgraph.generated.service_principals.service_principals_request_builder import (
            ServicePrincipalsRequestBuilder,
        )

        apps_query = ApplicationsRequestBuilder.ApplicationsRequestBuilderGetQueryParameters(
            filter=f"displayName eq '{m.identity.name}'"
        )
        found = await self._graph.applications.get(
            RequestConfiguration(query_parameters=apps_query)
        )
        app = found.value[0] if found and found.value else None
        if app is None or not app.id or not app.app_id:
            raise RuntimeError(f"application {m.identity.name} not found")
        sp_query = (
            ServicePrincipalsRequestBuilder.ServicePrincipalsRequestBuilderGetQueryParameters(
                filter=f"appId eq '{app.app_id}'"
            )
        )
        await self._graph.service_principals.get(RequestConfiguration(query_parameters=sp_query))
        body = FederatedIdentityCredential(
            name=credential_name(m),
            issuer=self._issuer,
            subject=f"system:serviceaccount:{m.namespace}:{m.service_account}",
            audiences=[AUDIENCE],
        )
        await self._graph.applications.by_application_id(
            app.id
        ).federated_identity_credentials.post(body)
        return app.app_id

    def _identity_credential(self, m: Member) -> str:
        """``az identity show`` and ``az identity federated-credential create``."""
        from azure.mgmt.msi.models import FederatedIdentityCredential

        resource_group, name = m.identity.ref.split("/")[4], m.identity.name
        identity = self._arm.user_assigned_identities.get(resource_group, name)
        self._arm.federated_identity_credentials.create_or_update(
            resource_group,
            name,
            credential_name(m),
            FederatedIdentityCredential(
                issuer=self._issuer,
                subject=f"system:serviceaccount:{m.namespace}:{m.service_account}",
                audiences=[AUDIENCE],
            ),
        )
        return str(identity.client_id)

    def _database_user(self, m: Member) -> None:
        """The seed's Step 2, in a session of its own (one ``sqlcmd`` per service account)."""
        import pyodbc

        token = self._sql_admin.get_token(SQL_SCOPE).token.encode("UTF-16-LE")
        connection = pyodbc.connect(
            f"DRIVER={{ODBC Driver 18 for SQL Server}};SERVER={self._sql_server};"
            f"DATABASE={SQL_DATABASE};Encrypt=yes;TrustServerCertificate=no",
            attrs_before={
                SQL_COPT_SS_ACCESS_TOKEN: struct.pack(f"<I{len(token)}s", len(token), token)
            },
            autocommit=True,
        )
        try:
            cursor = connection.cursor()
            name = m.identity.name
            found = cursor.execute(
                "SELECT name FROM sys.database_principals WHERE name = ?", name
            ).fetchall()
            if not found:
                cursor.execute(f"CREATE USER [{name}] FROM EXTERNAL PROVIDER")
            for role in SQL_ROLES:
                cursor.execute(f"ALTER ROLE {role} ADD MEMBER [{name}]")
        finally:
            connection.close()

    async def onboard(self, m: Member) -> None:
        if m.identity.kind == "app":
            client_id = await self._app_credential(m)
        else:
            client_id = self._identity_credential(m)
        self._core.create_namespaced_service_account(
            m.namespace,
            {
                "metadata": {
                    "name": m.service_account,
                    "annotations": {
                        CLIENT_ID_ANNOTATION: client_id,
                        TENANT_ID_ANNOTATION: self._tenant,
                    },
                }
            },
        )
        self._apps.patch_namespaced_deployment(
            m.deployment,
            m.namespace,
            {"spec": {"template": {"metadata": {"labels": {USE_LABEL: "true"}}}}},
        )
        if self._sql:
            self._database_user(m)

    async def run(self, members: Sequence[Member]) -> dict[str, Any]:
        """Onboard every member in turn; the seconds each took."""
        took = []
        for m in members:
            started = time.monotonic()
            await self.onboard(m)
            took.append(time.monotonic() - started)
        return {"per_member_s": took, "total_s": sum(took)}
