"""Invalid specs never reach the operator: the API server rejects them, naming the field."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from operator_harness import Cluster, eventually  # type: ignore[import-not-found]

pytestmark = pytest.mark.controlplane

APP = "5e0c1d9a-7b3f-4c2e-9a1d-000000000002"
MI = (
    "/subscriptions/3b9d2f10-6c1a-4e7b-8d5f-a2c4e6f8b0d1/resourceGroups/sandbox-rg/providers/"
    "Microsoft.ManagedIdentity/userAssignedIdentities/customer-api-identity"
)


def valid(**changes: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "serviceAccountName": "reader",
        "identity": {"applicationClientId": APP},
    }
    spec.update(changes)
    return spec


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (valid(serviceAccountName="Not_Valid"), "spec.serviceAccountName"),
        ({"identity": {"applicationClientId": APP}}, "spec.serviceAccountName: Required value"),
        (
            valid(identity={}),
            "set exactly one of applicationClientId, managedIdentityResourceId or poolName",
        ),
        (
            valid(identity={"applicationClientId": APP, "managedIdentityResourceId": MI}),
            "set exactly one of applicationClientId, managedIdentityResourceId or poolName",
        ),
        (
            valid(identity={"applicationClientId": "not-a-guid"}),
            "spec.identity.applicationClientId",
        ),
        (
            valid(identity={"managedIdentityResourceId": "/subscriptions/x/y"}),
            "spec.identity.managedIdentityResourceId",
        ),
        (valid(identity={"applicationClientId": APP, "tenantId": "x"}), "spec.identity.tenantId"),
        (valid(deletionPolicy="Orphan"), "spec.deletionPolicy: Unsupported value"),
        (valid(audience=""), "spec.audience"),
        (valid(sql={"server": "bad server;", "database": "mydb"}), "spec.sql.server"),
        (valid(sql={"server": "s.database.windows.net"}), "spec.sql.database: Required value"),
        (
            valid(workloads={"selector": {"matchExpressions": [{"key": "a", "operator": "In"}]}}),
            "In and NotIn need values",
        ),
    ],
)
def test_invalid_spec_is_rejected_with_the_field(
    cluster: Cluster, spec: dict[str, Any], expected: str
):
    with pytest.raises(ApiException) as rejected:
        cluster.create("bad", spec)
    assert rejected.value.status == 422
    assert expected in str(rejected.value.body)


def test_defaults_are_applied(cluster: Cluster):
    created = cluster.create("defaults", valid())
    assert created["spec"]["audience"] == "api://AzureADTokenExchange"
    assert created["spec"]["deletionPolicy"] == "Delete"
    cluster.delete("defaults")


def test_explain_documents_the_fields(cluster: Cluster):
    # The API server publishes a new CRD's OpenAPI a moment after it is established.
    explained = eventually(
        lambda: cluster.kubectl("explain", "swi.spec", check=False).stdout, 20, "kubectl explain"
    )
    for field in (
        "serviceAccountName",
        "identity",
        "audience",
        "workloads",
        "sql",
        "deletionPolicy",
    ):
        assert field in explained
    assert "exactly one of" in cluster.kubectl("explain", "swi.spec.identity").stdout
