"""Microsoft Graph through msgraph-sdk, pointed at the emulator the documented way.

The SDK gets an httpx client built by ``GraphClientFactory`` whose ``base_url`` is the emulator's
``/v1.0``, explicit scopes, and an async azure-identity credential; nothing in the SDK is patched.
"""

from __future__ import annotations

import time
from pathlib import Path

import jwt
import pytest
from azure.identity.aio import WorkloadIdentityCredential
from entra_harness import EntraService, GraphFactory, OidcIssuer
from kiota_abstractions.base_request_configuration import RequestConfiguration
from msgraph.generated.models.federated_identity_credential import FederatedIdentityCredential
from msgraph.generated.models.o_data_errors.o_data_error import ODataError
from msgraph.generated.service_principals.service_principals_request_builder import (
    ServicePrincipalsRequestBuilder,
)

OPERATOR = "sql-workload-identity-operator"  # Application.ReadWrite.OwnedBy, owns customer-api
APP = "customer-api"
AUDIENCE = "api://AzureADTokenExchange"


def _credential(
    name: str, subject: str, issuer: str = "https://issuer.example/cluster-a"
) -> FederatedIdentityCredential:
    return FederatedIdentityCredential(
        name=name, issuer=issuer, subject=subject, audiences=[AUDIENCE], description="test"
    )


def _upsert() -> RequestConfiguration:  # type: ignore[type-arg]
    config: RequestConfiguration = RequestConfiguration()  # type: ignore[type-arg]
    config.headers.add("Prefer", "create-if-missing")
    return config


async def test_credential_lifecycle(entra: EntraService, graph_as: GraphFactory) -> None:
    graph = graph_as(OPERATOR)
    app = entra.principal(APP)
    found = await graph.applications_with_app_id(app.client_id).get()
    assert found is not None and found.id == app.app_object_id
    credentials = graph.applications.by_application_id(app.app_object_id or "")
    created = await credentials.federated_identity_credentials.post(_credential("fic-a", "sa:a"))
    assert created is not None and created.id and created.audiences == [AUDIENCE]

    listed = await credentials.federated_identity_credentials.get()
    assert listed is not None and [c.name for c in listed.value or []] == ["fic-a"]
    fetched = await credentials.federated_identity_credentials.by_federated_identity_credential_id(
        created.id
    ).get()
    assert fetched is not None and fetched.subject == "sa:a"

    # Upsert by name: creates when missing (201), updates in place when present (204).
    by_name = credentials.federated_identity_credentials_with_name("fic-b")
    made = await by_name.patch(_credential("fic-b", "sa:b"), _upsert())
    assert made is not None and made.name == "fic-b"
    assert await by_name.patch(_credential("fic-b", "sa:b2"), _upsert()) is None
    updated = await by_name.get()
    assert updated is not None and (updated.subject, updated.id) == ("sa:b2", made.id)

    await credentials.federated_identity_credentials.by_federated_identity_credential_id(
        created.id
    ).delete()
    await by_name.delete()
    with pytest.raises(ODataError) as missing:
        await by_name.get()
    assert missing.value.response_status_code == 404
    assert (
        missing.value.error is not None and missing.value.error.code == "Request_ResourceNotFound"
    )


async def test_duplicate_issuer_and_subject(entra: EntraService, graph_as: GraphFactory) -> None:
    credentials = graph_as(OPERATOR).applications.by_application_id(
        entra.principal(APP).app_object_id or ""
    )
    await credentials.federated_identity_credentials.post(_credential("first", "sa:same"))
    with pytest.raises(ODataError) as duplicate:
        await credentials.federated_identity_credentials.post(_credential("second", "sa:same"))
    assert duplicate.value.response_status_code == 400
    assert duplicate.value.error is not None
    assert duplicate.value.error.code == "InvalidFederatedIdentityCredentialValue"
    assert "issuer and subject must be unique" in (duplicate.value.error.message or "")


async def test_twenty_first_credential_is_refused(
    entra: EntraService, graph_as: GraphFactory
) -> None:
    credentials = graph_as(OPERATOR).applications.by_application_id(
        entra.principal(APP).app_object_id or ""
    )
    for n in range(20):
        await credentials.federated_identity_credentials.post(_credential(f"fic-{n}", f"sa:{n}"))
    with pytest.raises(ODataError) as limit:
        await credentials.federated_identity_credentials.post(_credential("fic-20", "sa:20"))
    assert limit.value.response_status_code == 400
    assert limit.value.error is not None and limit.value.error.code == "Request_BadRequest"
    assert "maximum number of federated identity credentials (20)" in (
        limit.value.error.message or ""
    )


@pytest.mark.parametrize(
    ("caller", "app"),
    [
        (OPERATOR, "payroll-app"),  # OwnedBy, but not an owner
        ("SP-AZURESQL-USER", APP),  # no Graph permission at all
        ("sandbox-sql-server", APP),  # read-only
    ],
)
async def test_write_without_permission_is_403(
    entra: EntraService, graph_as: GraphFactory, caller: str, app: str
) -> None:
    credentials = graph_as(caller).applications.by_application_id(
        entra.principal(app).app_object_id or ""
    )
    with pytest.raises(ODataError) as denied:
        await credentials.federated_identity_credentials.post(_credential("nope", "sa:nope"))
    assert denied.value.response_status_code == 403
    assert denied.value.error is not None
    assert denied.value.error.code == "Authorization_RequestDenied"


async def test_service_principal_lookups(entra: EntraService, graph_as: GraphFactory) -> None:
    """What the Azure SQL emulator needs to resolve CREATE USER ... FROM EXTERNAL PROVIDER."""
    graph = graph_as("sandbox-sql-server")  # Application.Read.All
    demo = entra.principal("SP-AZURESQL-USER")
    query = ServicePrincipalsRequestBuilder.ServicePrincipalsRequestBuilderGetQueryParameters(
        filter="displayName eq 'SP-AZURESQL-USER'"
    )
    page = await graph.service_principals.get(RequestConfiguration(query_parameters=query))
    assert page is not None and [(s.app_id, s.id, s.display_name) for s in page.value or []] == [
        (demo.client_id, demo.sp_object_id, demo.name)
    ]
    by_id = await graph.service_principals.by_service_principal_id(demo.sp_object_id).get()
    assert by_id is not None and by_id.app_id == demo.client_id
    by_app_id = await graph.service_principals_with_app_id(demo.client_id).get()
    assert by_app_id is not None and by_app_id.id == demo.sp_object_id
    identity = entra.principal("customer-api-identity")
    mi = await graph.service_principals_with_app_id(identity.client_id).get()
    assert mi is not None and mi.service_principal_type == "ManagedIdentity"

    with pytest.raises(ODataError) as denied:
        await graph_as("SP-AZURESQL-USER").service_principals.get()
    assert denied.value.error is not None
    assert denied.value.error.code == "Authorization_RequestDenied"


async def test_workload_identity_with_credential_created_through_graph(
    entra: EntraService, graph_as: GraphFactory, fresh_issuer: OidcIssuer, tmp_path: Path
) -> None:
    app = entra.principal(APP)
    subject = "system:serviceaccount:workload-demo:customer-reader"
    await (
        graph_as(OPERATOR)
        .applications.by_application_id(app.app_object_id or "")
        .federated_identity_credentials_with_name("cluster-a")
        .patch(_credential("cluster-a", subject, issuer=fresh_issuer.url), _upsert())
    )
    token_file = tmp_path / "token"
    token_file.write_text(fresh_issuer.mint(subject))
    async with WorkloadIdentityCredential(
        tenant_id=entra.tenant_id,
        client_id=app.client_id,
        token_file_path=str(token_file),
        authority=entra.url,
        connection_verify=str(entra.ca),
    ) as credential:
        token = await credential.get_token("https://database.windows.net/.default")
    claims = jwt.decode(token.token, options={"verify_signature": False})
    assert (claims["oid"], claims["aud"]) == (app.sp_object_id, "https://database.windows.net/")


async def test_429_retry_after_is_honoured(entra: EntraService, graph_as: GraphFactory) -> None:
    graph = graph_as(OPERATOR)
    object_id = entra.principal(APP).app_object_id or ""
    await graph.applications.by_application_id(object_id).get()  # token acquired before timing
    entra.admin.fail("graph.fic.list", status=429, count=1, retry_after=1)
    started = time.monotonic()
    listed = await graph.applications.by_application_id(
        object_id
    ).federated_identity_credentials.get()
    assert listed is not None and time.monotonic() - started >= 1.0
    log = entra.admin.requests("graph.fic.list")["log"]
    assert [(r["status"], r["injected"]) for r in log] == [(429, True), (200, False)]


async def test_persistent_503_surfaces_after_sdk_retries(
    entra: EntraService, graph_as: GraphFactory
) -> None:
    graph = graph_as(OPERATOR)
    entra.admin.fail("graph.applications.get", status=503, count=10, retry_after=1)
    with pytest.raises(ODataError) as unavailable:
        await graph.applications.by_application_id(entra.principal(APP).app_object_id or "").get()
    assert unavailable.value.response_status_code == 503
    # kiota's RetryHandler: the call plus three retries.
    assert entra.admin.requests("graph.applications.get")["counts"] == {"graph.applications.get": 4}
