"""ARM managed identities and their federated credentials through azure-mgmt-msi."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jwt
import pytest
import requests
from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceNotFoundError
from azure.identity import WorkloadIdentityCredential
from azure.mgmt.msi import ManagedServiceIdentityClient
from azure.mgmt.msi.models import FederatedIdentityCredential, Identity
from entra_harness import EntraService, OidcIssuer

OPERATOR = "sql-workload-identity-operator"  # writer of customer-api-identity only
ADMIN = "sandbox-admin"  # writer of both identities
IDENTITY = "customer-api-identity"
OTHER_IDENTITY = "finance-identity"
AUDIENCE = "api://AzureADTokenExchange"

ArmFactory = Callable[[str], ManagedServiceIdentityClient]


@pytest.fixture
def arm_as(entra: EntraService) -> ArmFactory:
    def build(app: str) -> ManagedServiceIdentityClient:
        return ManagedServiceIdentityClient(
            entra.secret_credential(app),
            entra.subscription_id,
            base_url=entra.env["SANDBOX_ARM_URL"],
            credential_scopes=["https://management.azure.com/.default"],
            connection_verify=str(entra.ca),
        )

    return build


def _rg(entra: EntraService) -> str:
    return entra.principal(IDENTITY).resource_group or ""


def _fic(
    subject: str, issuer: str = "https://issuer.example/cluster-a"
) -> FederatedIdentityCredential:
    return FederatedIdentityCredential(issuer=issuer, subject=subject, audiences=[AUDIENCE])


def _error_code(exc: HttpResponseError) -> str | None:
    return exc.error.code if exc.error is not None else None


def test_identity_and_credential_lifecycle(entra: EntraService, arm_as: ArmFactory) -> None:
    arm = arm_as(OPERATOR)
    rg = _rg(entra)
    expected = entra.principal(IDENTITY)
    identity = arm.user_assigned_identities.get(rg, IDENTITY)
    assert (identity.client_id, identity.principal_id, identity.tenant_id) == (
        expected.client_id,
        expected.sp_object_id,
        entra.tenant_id,
    )
    # Only the identities the caller has a role on are listed.
    assert [i.name for i in arm.user_assigned_identities.list_by_resource_group(rg)] == [IDENTITY]

    fics = arm.federated_identity_credentials
    created = fics.create_or_update(rg, IDENTITY, "cluster-a", _fic("sa:a"))
    assert created.name == "cluster-a" and created.audiences == [AUDIENCE]
    assert created.id is not None and created.id.endswith("/federatedIdentityCredentials/cluster-a")
    for name in ("cluster-b", "cluster-c"):
        fics.create_or_update(rg, IDENTITY, name, _fic(f"sa:{name}"))
    # Paged with $top: the SDK follows nextLink.
    assert sorted(c.name for c in fics.list(rg, IDENTITY, top=2)) == [
        "cluster-a",
        "cluster-b",
        "cluster-c",
    ]
    updated = fics.create_or_update(rg, IDENTITY, "cluster-a", _fic("sa:a2"))
    assert fics.get(rg, IDENTITY, "cluster-a").subject == updated.subject == "sa:a2"

    fics.delete(rg, IDENTITY, "cluster-a")
    fics.delete(rg, IDENTITY, "cluster-a")  # deleting what is gone is fine (204)
    with pytest.raises(ResourceNotFoundError):
        fics.get(rg, IDENTITY, "cluster-a")
    statuses = [(r["method"], r["status"]) for r in entra.admin.requests("arm.fic.*")["log"]]
    assert statuses.count(("PUT", 201)) == 3 and ("PUT", 200) in statuses
    assert [s for s in statuses if s[0] == "DELETE"] == [("DELETE", 200), ("DELETE", 204)]


def test_missing_identity_is_404(entra: EntraService, arm_as: ArmFactory) -> None:
    with pytest.raises(ResourceNotFoundError) as missing:
        arm_as(ADMIN).federated_identity_credentials.create_or_update(
            _rg(entra), "no-such-identity", "cluster-a", _fic("sa:a")
        )
    assert _error_code(missing.value) == "ResourceNotFound"


def test_no_role_is_403_authorization_failed(entra: EntraService, arm_as: ArmFactory) -> None:
    with pytest.raises(HttpResponseError) as denied:
        arm_as(OPERATOR).federated_identity_credentials.create_or_update(
            _rg(entra), OTHER_IDENTITY, "cluster-a", _fic("sa:a")
        )
    assert denied.value.status_code == 403
    assert _error_code(denied.value) == "AuthorizationFailed"
    assert "federatedIdentityCredentials/write" in str(denied.value)


@pytest.mark.parametrize(
    ("name", "body", "message"),
    [
        ("-bad", _fic("sa:x"), "Federated Identity Credential name '-bad' is invalid."),
        (
            "two-audiences",
            FederatedIdentityCredential(
                issuer="https://i.example", subject="s", audiences=["a", "b"]
            ),
            "Federated identity credentials must have exactly one audience.",
        ),
        ("duplicate", _fic("sa:first"), "Issuer and subject combination already exists"),
    ],
)
def test_invalid_writes_are_400(
    entra: EntraService,
    arm_as: ArmFactory,
    name: str,
    body: FederatedIdentityCredential,
    message: str,
) -> None:
    fics = arm_as(OPERATOR).federated_identity_credentials
    fics.create_or_update(_rg(entra), IDENTITY, "first", _fic("sa:first"))
    with pytest.raises(HttpResponseError) as invalid:
        fics.create_or_update(_rg(entra), IDENTITY, name, body)
    assert invalid.value.status_code == 400
    assert message in str(invalid.value)


def test_twenty_first_credential_is_refused(entra: EntraService, arm_as: ArmFactory) -> None:
    fics = arm_as(OPERATOR).federated_identity_credentials
    for n in range(20):
        fics.create_or_update(_rg(entra), IDENTITY, f"fic-{n}", _fic(f"sa:{n}"))
    with pytest.raises(HttpResponseError) as limit:
        fics.create_or_update(_rg(entra), IDENTITY, "fic-20", _fic("sa:20"))
    assert limit.value.status_code == 400
    assert "maximum of 20" in str(limit.value)


def test_concurrent_writes_on_one_identity_conflict(
    entra: EntraService, arm_as: ArmFactory
) -> None:
    entra.admin.controls(armWriteSeconds=0.5)
    clients = [arm_as(ADMIN), arm_as(ADMIN)]
    for client in clients:  # tokens first, so that the two PUTs really overlap
        client.user_assigned_identities.get(_rg(entra), IDENTITY)

    def write(n: int) -> str:
        try:
            clients[n].federated_identity_credentials.create_or_update(
                _rg(entra), IDENTITY, f"parallel-{n}", _fic(f"sa:{n}")
            )
        except ResourceExistsError as exc:
            return f"409 {_error_code(exc)}"
        return "ok"

    with ThreadPoolExecutor(2) as pool:
        outcomes = sorted(pool.map(write, range(2)))
    assert outcomes == [
        "409 ConcurrentFederatedIdentityCredentialsWritesForSingleManagedIdentity",
        "ok",
    ]


def test_concurrent_writes_on_different_identities_succeed(
    entra: EntraService, arm_as: ArmFactory
) -> None:
    entra.admin.controls(armWriteSeconds=0.5)
    clients = [arm_as(ADMIN), arm_as(ADMIN)]
    identities = [IDENTITY, OTHER_IDENTITY]
    for client, identity in zip(clients, identities, strict=True):
        client.user_assigned_identities.get(_rg(entra), identity)

    def write(n: int) -> str:
        result = clients[n].federated_identity_credentials.create_or_update(
            _rg(entra), identities[n], "parallel", _fic("sa:parallel")
        )
        return str(result.name)

    started = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(write, range(2))) == ["parallel", "parallel"]
    assert time.monotonic() - started < 0.95  # the two writes overlapped


def test_api_version_and_token_are_required(entra: EntraService) -> None:
    rg = _rg(entra)
    url = (
        f"{entra.env['SANDBOX_ARM_URL']}/subscriptions/{entra.subscription_id}/resourceGroups/{rg}"
        f"/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{IDENTITY}"
    )
    token = entra.token(ADMIN, "https://management.azure.com/")
    headers = {"Authorization": f"Bearer {token}"}
    missing = entra.http.get(url, headers=headers, timeout=10)
    assert (missing.status_code, missing.json()["error"]["code"]) == (
        400,
        "MissingApiVersionParameter",
    )
    wrong = entra.http.get(url, params={"api-version": "2001-01-01"}, headers=headers, timeout=10)
    assert wrong.json()["error"]["code"] == "InvalidApiVersionParameter"
    anonymous = entra.http.get(url, params={"api-version": "2024-11-30"}, timeout=10)
    assert (anonymous.status_code, anonymous.json()["error"]["code"]) == (
        401,
        "AuthenticationFailed",
    )
    graph_token = entra.token(ADMIN, "https://graph.microsoft.com")
    wrong_audience = entra.http.get(
        url,
        params={"api-version": "2024-11-30"},
        headers={"Authorization": f"Bearer {graph_token}"},
        timeout=10,
    )
    assert wrong_audience.status_code == 401
    ok = entra.http.get(url, params={"api-version": "2023-01-31"}, headers=headers, timeout=10)
    assert ok.status_code == 200 and ok.json()["properties"]["clientId"]


def test_managed_identity_signs_in_with_its_federated_credential(
    entra: EntraService, arm_as: ArmFactory, fresh_issuer: OidcIssuer, tmp_path: Path
) -> None:
    subject = "system:serviceaccount:workload-demo:customer-reader"
    arm_as(OPERATOR).federated_identity_credentials.create_or_update(
        _rg(entra), IDENTITY, "cluster-a", _fic(subject, issuer=fresh_issuer.url)
    )
    token_file = tmp_path / "token"
    token_file.write_text(fresh_issuer.mint(subject))
    identity = entra.principal(IDENTITY)
    credential = WorkloadIdentityCredential(
        tenant_id=entra.tenant_id,
        client_id=identity.client_id,
        token_file_path=str(token_file),
        authority=entra.url,
        connection_verify=str(entra.ca),
    )
    claims = jwt.decode(
        credential.get_token("https://database.windows.net/.default").token,
        options={"verify_signature": False},
    )
    assert (claims["oid"], claims["appid"]) == (identity.sp_object_id, identity.client_id)


def test_429_retry_after_is_honoured(entra: EntraService, arm_as: ArmFactory) -> None:
    arm = arm_as(OPERATOR)
    arm.user_assigned_identities.get(_rg(entra), IDENTITY)
    entra.admin.fail("arm.fic.put", status=429, count=1, retry_after=1)
    started = time.monotonic()
    arm.federated_identity_credentials.create_or_update(_rg(entra), IDENTITY, "x-1", _fic("sa:x"))
    assert time.monotonic() - started >= 1.0
    log = entra.admin.requests("arm.fic.put")["log"]
    assert [(r["status"], r["injected"]) for r in log] == [(429, True), (201, False)]


def test_rate_limit_per_identity(entra: EntraService) -> None:
    """Azure's 0.25 writes/s per identity, scaled up: the second write within the window is 429."""
    entra.admin.rate_limit("arm.fic.put", rate=0.5, burst=1)
    token = entra.token(ADMIN, "https://management.azure.com/")
    base = (
        f"{entra.env['SANDBOX_ARM_URL']}/subscriptions/{entra.subscription_id}/resourceGroups/"
        f"{_rg(entra)}/providers/Microsoft.ManagedIdentity/userAssignedIdentities"
    )

    def put(identity: str, name: str) -> requests.Response:
        return entra.http.put(
            f"{base}/{identity}/federatedIdentityCredentials/{name}",
            params={"api-version": "2024-11-30"},
            json={
                "properties": {
                    "issuer": "https://i.example",
                    "subject": name,
                    "audiences": [AUDIENCE],
                }
            },
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )

    assert put(IDENTITY, "one").status_code == 201
    limited = put(IDENTITY, "two")
    assert (limited.status_code, limited.headers["Retry-After"]) == (429, "2")
    assert limited.json()["error"]["code"] == "TooManyRequests"
    assert put(OTHER_IDENTITY, "one").status_code == 201  # another identity, another bucket


# -- identity pools: user-assigned identities created and deleted through ARM -----------------

POOL_RG = "sandbox-pool-rg"  # the operator holds Managed Identity Contributor on all of it


def test_operator_creates_and_deletes_identities_in_its_resource_group(
    entra: EntraService, arm_as: ArmFactory
) -> None:
    arm = arm_as(OPERATOR)
    created = arm.user_assigned_identities.create_or_update(
        POOL_RG, "pool-mi-1", Identity(location="eastus", tags={"pool": "readers"})
    )
    assert created.principal_id and created.client_id and created.tenant_id == entra.tenant_id
    assert created.name == "pool-mi-1" and created.tags == {"pool": "readers"}
    assert created.id == (
        f"/subscriptions/{entra.subscription_id}/resourceGroups/{POOL_RG}/providers/"
        "Microsoft.ManagedIdentity/userAssignedIdentities/pool-mi-1"
    )
    # Create-or-update of an existing identity keeps its ids and replaces its tags.
    again = arm.user_assigned_identities.create_or_update(
        POOL_RG, "pool-mi-1", Identity(location="eastus", tags={})
    )
    assert (again.principal_id, again.client_id, again.tags) == (
        created.principal_id,
        created.client_id,
        {},
    )
    listed = arm.user_assigned_identities.list_by_resource_group(POOL_RG)
    assert [i.name for i in listed] == ["pool-mi-1"]
    # Its service principal exists in the directory, as a managed identity's does.
    sp = entra.graph("GET", f"/servicePrincipals/{created.principal_id}")
    assert sp.status_code == 200 and sp.json()["servicePrincipalType"] == "ManagedIdentity"
    # And it can hold federated credentials, written by the same role.
    arm.federated_identity_credentials.create_or_update(POOL_RG, "pool-mi-1", "ns-a", _fic("a"))

    arm.user_assigned_identities.delete(POOL_RG, "pool-mi-1")
    with pytest.raises(ResourceNotFoundError):
        arm.user_assigned_identities.get(POOL_RG, "pool-mi-1")
    assert entra.graph("GET", f"/servicePrincipals/{created.principal_id}").status_code == 404
    arm.user_assigned_identities.delete(POOL_RG, "pool-mi-1")  # 204: already gone, no error


def test_deleted_identity_leaves_its_groups(entra: EntraService, arm_as: ArmFactory) -> None:
    arm = arm_as(ADMIN)
    made = arm.user_assigned_identities.create_or_update(
        POOL_RG, "member", Identity(location="eastus")
    )
    group = entra.graph(
        "POST",
        "/groups",
        {
            "displayName": "pool",
            "mailNickname": "pool",
            "mailEnabled": False,
            "securityEnabled": True,
            "members@odata.bind": [
                f"https://graph.microsoft.com/v1.0/directoryObjects/{made.principal_id}"
            ],
        },
    )
    assert group.status_code == 201, group.text
    members = f"/groups/{group.json()['id']}/members"
    assert [m["id"] for m in entra.graph("GET", members).json()["value"]] == [made.principal_id]
    arm.user_assigned_identities.delete(POOL_RG, "member")
    assert entra.graph("GET", members).json()["value"] == []


def test_identity_writes_need_the_role_and_valid_input(
    entra: EntraService, arm_as: ArmFactory
) -> None:
    operator = arm_as(OPERATOR)
    # The operator's role in sandbox-rg is on customer-api-identity alone, not on the group.
    with pytest.raises(HttpResponseError) as denied:
        operator.user_assigned_identities.create_or_update(
            _rg(entra), "not-mine", Identity(location="eastus")
        )
    assert denied.value.status_code == 403 and _error_code(denied.value) == "AuthorizationFailed"
    assert "Microsoft.ManagedIdentity/userAssignedIdentities/write" in str(denied.value)
    with pytest.raises(HttpResponseError) as delete_denied:
        operator.user_assigned_identities.delete(_rg(entra), OTHER_IDENTITY)
    assert delete_denied.value.status_code == 403
    assert arm_as(ADMIN).user_assigned_identities.get(_rg(entra), OTHER_IDENTITY).name == (
        OTHER_IDENTITY
    )

    with pytest.raises(HttpResponseError) as no_location:
        operator.user_assigned_identities.create_or_update(
            POOL_RG, "pool-mi", Identity(location="")
        )
    assert no_location.value.status_code == 400
    assert _error_code(no_location.value) == "LocationRequired"
    with pytest.raises(HttpResponseError) as bad_name:
        operator.user_assigned_identities.create_or_update(
            POOL_RG, "x", Identity(location="eastus")
        )
    assert _error_code(bad_name.value) == "InvalidResourceName"
    with pytest.raises(ResourceNotFoundError) as no_group:
        operator.user_assigned_identities.create_or_update(
            "no-such-rg", "pool-mi", Identity(location="eastus")
        )
    assert _error_code(no_group.value) == "ResourceGroupNotFound"
