"""A SqlWorkloadIdentity's life against the sandbox: create, use, change, delete.

The operator runs for real (KopfRunner), Graph and ARM are the Entra emulator, and "works" means
what it means for a pod: a TokenRequest token of the service account is exchanged at the token
endpoint for an access token of the identity.
"""

from __future__ import annotations

import jwt
import pytest
from operator_harness import AUDIENCE, DRIFT_INTERVAL_S, Cluster, Entra, World, eventually  # type: ignore[import-not-found]

pytestmark = pytest.mark.controlplane

SA = "workload-demo-service-account"


def app_spec(world: World, **extra: object) -> dict[str, object]:
    return {
        "serviceAccountName": SA,
        "identity": {"applicationClientId": world.demo_app.client_id},
        **extra,
    }


def test_create_gives_a_credential_the_token_endpoint_accepts(
    operator, cluster: Cluster, entra: Entra, world: World, sandbox
):
    cluster.create("customer-reader", app_spec(world))

    waited = cluster.kubectl(
        "wait", "--for=condition=Ready", "swi/customer-reader", "--timeout=30s"
    )
    assert "condition met" in waited.stdout

    (credential,) = entra.credentials(world.demo_app)
    subject = f"system:serviceaccount:{cluster.namespace}:{SA}"
    assert (credential["issuer"], credential["subject"]) == (sandbox.issuer, subject)
    assert credential["audiences"] == [AUDIENCE]
    assert f"SqlWorkloadIdentity {cluster.namespace}/customer-reader" in credential["description"]

    body = cluster.get("customer-reader")
    assert body is not None
    status = body["status"]
    assert status["issuer"] == sandbox.issuer and status["subject"] == subject
    assert status["federatedCredential"]["name"] == credential["name"]
    assert status["federatedCredential"]["id"] == credential["id"]
    assert status["observedGeneration"] == body["metadata"]["generation"]
    types = {c["type"]: c["status"] for c in status["conditions"]}
    assert types == {
        "Ready": "True",
        "Authorized": "True",  # PolicyNotRequired: these tests run with requirePolicy off
        "FederatedCredentialReady": "True",
        "ServiceAccountReady": "True",
        "WorkloadsReady": "True",
        "DatabaseAccessReady": "True",  # NotRequested: no spec.sql
        "Verified": "True",
        "Reconciling": "False",  # kstatus's conditions, derived from Ready
        "Stalled": "False",
    }

    annotations = cluster.service_account(SA).metadata.annotations
    assert annotations["azure.workload.identity/client-id"] == world.demo_app.client_id
    assert annotations["azure.workload.identity/tenant-id"] == world.tenant

    exchanged = entra.exchange(world.demo_app.client_id, cluster.token(SA))
    assert exchanged.status_code == 200, exchanged.text
    claims = jwt.decode(exchanged.json()["access_token"], options={"verify_signature": False})
    assert claims["appid"] == world.demo_app.client_id

    reasons = set(cluster.reasons("customer-reader"))
    assert {"CredentialCreated", "ServiceAccountCreated", "Ready"} <= reasons


def test_kubectl_get_shows_the_columns(operator, cluster: Cluster, world: World):
    cluster.create("customer-reader", app_spec(world))
    cluster.create(
        "payroll",
        {
            "serviceAccountName": "payroll",
            "identity": {"applicationClientId": world.payroll.client_id},
        },
    )
    cluster.wait_condition("customer-reader")
    cluster.wait_condition("payroll", "False", reason="PermissionDenied")

    table = cluster.kubectl("get", "swi").stdout.splitlines()

    header = table[0].split()
    assert header == [
        "NAME",
        "SERVICE",
        "ACCOUNT",
        "IDENTITY",
        "DATABASE",
        "READY",
        "REASON",
        "AGE",
    ]
    rows = {line.split()[0]: line for line in table[1:]}
    assert "SP-AZURESQL-USER" in rows["customer-reader"]
    assert " True " in rows["customer-reader"] and "Reconciled" in rows["customer-reader"]
    assert " False " in rows["payroll"] and "PermissionDenied" in rows["payroll"]
    wide = cluster.kubectl("get", "swi", "customer-reader", "-o", "wide").stdout
    assert "CREDENTIAL" in wide and "ISSUER" in wide


def test_managed_identity_variant(operator, cluster: Cluster, entra: Entra, world: World, sandbox):
    identity = world.customer_identity
    cluster.create(
        "customer-api",
        {
            "serviceAccountName": "customer-api",
            "identity": {"managedIdentityResourceId": identity.object_id},
        },
    )
    cluster.wait_condition("customer-api")

    (credential,) = entra.credentials(identity)
    assert credential["issuer"] == sandbox.issuer
    assert credential["subject"] == f"system:serviceaccount:{cluster.namespace}:customer-api"
    annotations = cluster.service_account("customer-api").metadata.annotations
    assert annotations["azure.workload.identity/client-id"] == identity.client_id
    body = cluster.get("customer-api")
    assert body is not None
    assert body["status"]["identity"]["name"] == "customer-api-identity"
    assert body["status"]["identity"]["kind"] == "ManagedIdentity"

    exchanged = entra.exchange(identity.client_id, cluster.token("customer-api"))
    assert exchanged.status_code == 200, exchanged.text


def test_spec_change_moves_the_credential_and_removes_the_old_one(
    operator, cluster: Cluster, entra: Entra, world: World
):
    cluster.create("customer-reader", app_spec(world))
    cluster.wait_condition("customer-reader")
    (old,) = entra.credentials(world.demo_app)

    cluster.patch_spec("customer-reader", {"serviceAccountName": "renamed"})

    def moved() -> bool:
        creds = entra.credentials(world.demo_app)
        return len(creds) == 1 and creds[0]["subject"].endswith(":renamed")

    eventually(moved, 30, "credential moved to the new subject")
    body = cluster.wait_condition("customer-reader", generation=2)
    assert body["reason"] == "Reconciled"
    assert cluster.service_account(SA) is None  # the operator created it, so it deleted it
    assert cluster.service_account("renamed") is not None
    assert entra.exchange(world.demo_app.client_id, cluster.token("renamed")).status_code == 200
    assert old["name"] not in [c["name"] for c in entra.credentials(world.demo_app)]

    # Identity change: from the app to the managed identity.
    cluster.patch_spec(
        "customer-reader",
        {
            "identity": {
                "applicationClientId": None,
                "managedIdentityResourceId": world.customer_identity.object_id,
            }
        },
    )
    eventually(lambda: entra.credentials(world.customer_identity), 30, "credential on the identity")
    eventually(lambda: not entra.credentials(world.demo_app), 30, "credential gone from the app")
    cluster.wait_condition("customer-reader")
    annotations = cluster.service_account("renamed").metadata.annotations
    assert annotations["azure.workload.identity/client-id"] == world.customer_identity.client_id


def test_delete_removes_everything_the_operator_made(
    operator, cluster: Cluster, entra: Entra, world: World
):
    cluster.core.create_namespaced_service_account(
        cluster.namespace,
        {"metadata": {"name": SA, "annotations": {"team": "payments"}}},
    )
    cluster.create("customer-reader", app_spec(world))
    cluster.wait_condition("customer-reader")
    assert entra.credentials(world.demo_app)

    cluster.delete("customer-reader")
    cluster.wait_gone("customer-reader")

    assert entra.credentials(world.demo_app) == []
    annotations = cluster.service_account(SA).metadata.annotations  # existed before: kept
    assert annotations == {"team": "payments"}


def test_retain_keeps_the_credential(operator, cluster: Cluster, entra: Entra, world: World):
    cluster.create("customer-reader", app_spec(world, deletionPolicy="Retain"))
    cluster.wait_condition("customer-reader")
    cluster.delete("customer-reader")
    cluster.wait_gone("customer-reader")
    assert len(entra.credentials(world.demo_app)) == 1
    assert cluster.service_account(SA) is None


def test_workloads_are_labelled_now_and_later(operator, cluster: Cluster, world: World):
    def deployment(name: str) -> dict[str, object]:
        labels = {"app": name}
        return {
            "metadata": {"name": name, "labels": labels},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "serviceAccountName": SA,
                        "containers": [{"name": "app", "image": "registry.invalid/app:1"}],
                    },
                },
            },
        }

    cluster.apps.create_namespaced_deployment(cluster.namespace, deployment("before"))
    cluster.create("customer-reader", app_spec(world))
    cluster.wait_condition("customer-reader")

    def labelled(name: str) -> bool:
        template = cluster.apps.read_namespaced_deployment(name, cluster.namespace).spec.template
        return (template.metadata.labels or {}).get("azure.workload.identity/use") == "true"

    assert labelled("before")
    cluster.apps.create_namespaced_deployment(cluster.namespace, deployment("after"))
    eventually(
        lambda: labelled("after"), DRIFT_INTERVAL_S * 5, "the drift check labels a new workload"
    )

    def counted() -> bool:
        body = cluster.get("customer-reader") or {}
        return bool((body.get("status") or {}).get("workloads", {}).get("labelled") == 2)

    eventually(counted, DRIFT_INTERVAL_S * 5, "status counts both workloads")

    cluster.delete("customer-reader")
    cluster.wait_gone("customer-reader")
    assert not labelled("before") and not labelled("after")
